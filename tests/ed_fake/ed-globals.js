/*
    Test double of the Easy Diffusion globals a UI plugin uses (ED v3.0.16, main 19c805ee).

    Written from ED's documented/observed contract, not copied from ED: same names, same signatures, same
    kind of declaration (function declarations are window properties; `let`/`const` bindings are NOT, as
    in ED's classic scripts), same observable behaviour for the paths our plugin uses. README.md lists
    each one and where this double is simpler than ED.

    Test-only instrumentation: window.__edFake.calls records getModels / Bucket / showToast / selectTab calls.
*/
"use strict"

window.__edFake = { calls: [], ready: false }
function __edRecord(fn, args) {
    window.__edFake.calls.push({ fn: fn, args: JSON.parse(JSON.stringify(args || [])), t: Date.now() })
}

/* ---------------------------------------------------------------- utils.js */

function createElement(tagName, attributes, classes, textOrElements) {
    const element = document.createElement(tagName)
    for (const [key, value] of Object.entries(attributes || {})) {
        if (value !== undefined && value !== null) element.setAttribute(key, value)
    }
    if (classes) {
        for (const c of Array.isArray(classes) ? classes : [classes]) element.classList.add(c)
    }
    if (textOrElements) {
        for (const child of Array.isArray(textOrElements) ? textOrElements : [textOrElements]) {
            element.appendChild(child instanceof Node ? child : document.createTextNode(child))
        }
    }
    return element
}

// createTab(request): request = {id, icon, label, css?, content? | onOpen?}. Builds
// <span id="tab-<id>" class="tab"> in .tab-container and
// <div id="tab-content-<id>" class="tab-content"><div id="<id>" class="tab-content-inner">.
// `content` (string | Node | Promise | function) is placed at once; onOpen({contentElement, labelElement,
// timesOpened, firstOpen}, event) runs on every click and its non-null result replaces the content.
function createTab(request) {
    if (!request || !request.id || !request.label || !request.icon || !(request.content || request.onOpen)) {
        console.error("createTab() error - id, label, icon and content or onOpen are required")
        return
    }
    const tabsContainer = document.querySelector(".tab-container")
    const wrapperEl = document.querySelector("#tab-content-wrapper")
    if (!tabsContainer || !wrapperEl) return
    if (request.css) {
        document.body.insertAdjacentElement("beforeend", createElement("style", { id: `tab-${request.id}-css` }, undefined, request.css))
    }
    const label = typeof request.label === "function" ? request.label() : request.label
    const labelElement = label instanceof Node ? label : createElement("span", undefined, undefined, label)
    const iconName = (request.icon.startsWith("fa-") ? "" : "fa-") + request.icon
    const tab = createElement("span", { id: `tab-${request.id}`, "data-times-opened": 0 }, ["tab"], createElement("span", undefined, undefined, [
        createElement("i", { style: "margin-right: 0.25em" }, ["fa-solid", iconName, "icon"]),
        labelElement,
    ]))
    tabsContainer.insertAdjacentElement("beforeend", tab)
    const wrapper = createElement("div", { id: request.id }, ["tab-content-inner"], "Loading..")
    wrapperEl.insertAdjacentElement("beforeend", createElement("div", { id: `tab-content-${request.id}` }, ["tab-content"], wrapper))
    linkTabContents(tab)

    function replaceContent(result) {
        if (result === undefined || result === null) return
        const value = typeof result === "function" ? result() : result
        if (value instanceof Promise) value.then(replaceContent)
        else if (value instanceof Node) wrapper.replaceChildren(value)
        else wrapper.innerHTML = value
    }
    replaceContent(request.content)
    tab.addEventListener("click", (e) => {
        const timesOpened = +(tab.dataset.timesOpened || 0) + 1
        tab.dataset.timesOpened = timesOpened
        if (request.onOpen) {
            replaceContent(request.onOpen({ contentElement: wrapper, labelElement, timesOpened, firstOpen: timesOpened === 1 }, e))
        }
    })
}

// showToast(message, duration = 5000, error = false): message is HTML (innerHTML), like ED's.
function showToast(message, duration = 5000, error = false) {
    __edRecord("showToast", [message, duration, error])
    const toast = document.createElement("div")
    toast.classList.add("toast-notification")
    if (error === true) toast.classList.add("toast-notification-error")
    toast.innerHTML = message
    document.body.appendChild(toast)
    const others = Array.from(document.querySelectorAll(".toast-notification")).slice(0, -1)
    toast.style.bottom = 10 + others.reduce((h, t) => h + t.offsetHeight + 10, 0) + "px"
    toast.style.right = "10px"
    setTimeout(() => {
        toast.classList.add("hide")
        setTimeout(() => toast.remove(), 500)
    }, duration)
}

/* ---------------------------------------------------------------- engine.js: SD.getModels */

const SD = {
    // GET /get/models?scan_for_malicious=..; on failure returns {"stable-diffusion": [], vae: []}
    async getModels(scanForMalicious = true) {
        try {
            const res = await fetch("/get/models?scan_for_malicious=" + scanForMalicious)
            if (!res.ok) return { "stable-diffusion": [], vae: [] }
            return await res.json()
        } catch (e) {
            return { "stable-diffusion": [], vae: [] }
        }
    },
}

/* ---------------------------------------------------------------- searchable-models.js */

let modelsCache
let modelsOptions
let modelsDB

const MODEL_TYPES = ["stable-diffusion", "vae", "hypernetwork", "gfpgan", "realesrgan", "lora", "codeformer", "embeddings", "controlnet", "text-encoder"]

function buildModelsDBForTest(models) {
    const db = {}
    for (const m of models) {
        const type = m.tags[0]
        db[type] = db[type] || {}
        db[type][m.model] = m
    }
    return db
}

// async getModels(scanForMalicious = true): rebuilds modelsCache, modelsOptions (per-type id lists) and
// modelsDB[type][id] = {model, name, tags}, then dispatches "refreshModels" on document, like ED's.
async function getModels(scanForMalicious = true) {
    __edRecord("getModels", [scanForMalicious])
    try {
        modelsCache = await SD.getModels(scanForMalicious)
        const options = {}
        for (const t of MODEL_TYPES) options[t] = []
        for (const m of modelsCache.models || []) (options[m.tags[0]] = options[m.tags[0]] || []).push(m.model)
        modelsCache.options = options
        modelsOptions = options
        modelsDB = buildModelsDBForTest(modelsCache.models || [])
        document.dispatchEvent(new Event("refreshModels"))
    } catch (e) {
        console.log("get models error", e)
    }
}

// ModelDropdown(input, modelKey, noneEntry = "", sorted = true): .value is the model id (input.dataset.path).
// Setting .value to an id that is in the list selects it; to an unknown id, it keeps the previous valid
// selection, or falls back to the none entry / first model (ED: selectEntry -> selectFirstFile).
class ModelDropdown {
    constructor(input, modelKey, noneEntry = "", sorted = true) {
        this.modelFilter = input
        this.modelKey = modelKey
        this.noneEntry = noneEntry
        this.sorted = sorted
        this.valid = false
        input.classList.add("model-selector")
        input.readOnly = true
        if (modelsOptions !== undefined) this.populateModels()
        document.addEventListener("refreshModels", () => this.populateModels())
    }
    ids() {
        const keys = Array.isArray(this.modelKey) ? this.modelKey : [this.modelKey]
        const out = []
        for (const k of keys) out.push(...((modelsOptions && modelsOptions[k]) || []))
        return this.sorted ? out.sort((a, b) => a.localeCompare(b)) : out
    }
    get value() {
        return this.modelFilter.dataset.path
    }
    set value(path) {
        this.modelFilter.dataset.path = path
        this.selectEntry(path)
    }
    get disabled() {
        return this.modelFilter.disabled
    }
    set disabled(v) {
        this.modelFilter.disabled = v
    }
    get parentElement() {
        return this.modelFilter.parentElement
    }
    addEventListener(type, listener, options) {
        return this.modelFilter.addEventListener(type, listener, options)
    }
    dispatchEvent(event) {
        return this.modelFilter.dispatchEvent(event)
    }
    save(path, dispatch) {
        this.modelFilter.dataset.path = path
        this.modelFilter.value = path === "" ? this.noneEntry : path
        this.valid = true
        this.lastValid = path
        if (dispatch) this.modelFilter.dispatchEvent(new Event("change"))
    }
    selectEntry(path, dispatch = true) {
        const ids = this.ids()
        if (path !== undefined && (ids.includes(path) || (path === "" && this.noneEntry))) {
            this.save(path, dispatch)
        } else if (this.valid) {
            this.modelFilter.dataset.path = this.lastValid
        } else {
            this.save(this.noneEntry ? "" : ids[0] || "", dispatch)
        }
    }
    populateModels() {
        const active = this.modelFilter.dataset.path
        this.valid = false
        this.selectEntry(active, false)
    }
}

/* ---------------------------------------------------------------- multi-model-selector.js */

// MultiModelSelector(root, modelType, modelNameFriendly, defaultWeight = 0.5, weightStep = 0.02, showWeights = true)
// .value -> {modelNames, modelWeights} (empty rows left out); setting it resizes the rows, then assigns
// weights first, names second (each name through ModelDropdown's setter), like ED's.
class MultiModelSelector {
    constructor(root, modelType, modelNameFriendly, defaultWeight = 0.5, weightStep = 0.02, showWeights = true) {
        this.root = root
        this.modelType = modelType
        this.modelNameFriendly = modelNameFriendly || modelType
        this.defaultWeight = defaultWeight
        this.weightStep = weightStep
        this.showWeights = showWeights
        this.counter = 0
        this.modelContainer = document.createElement("div")
        this.modelContainer.className = "model_entries"
        root.appendChild(this.modelContainer)
        const add = document.createElement("button")
        add.className = "add_model_entry"
        add.textContent = "+ add another " + this.modelNameFriendly
        add.addEventListener("click", () => this.addModelEntry())
        root.appendChild(add)
        this.addModelEntry()
    }
    get id() {
        return this.root.id
    }
    getModelElements(ignoreEmpty = false) {
        return Array.from(this.root.querySelectorAll(".model_entry"))
            .map((e) => ({ name: e.querySelector(".model_name").field, weight: e.querySelector(".model_weight") }))
            .filter((e) => !(ignoreEmpty && e.name.value.trim() === ""))
    }
    get length() {
        return this.getModelElements().length
    }
    get value() {
        return { modelNames: this.modelNames, modelWeights: this.modelWeights }
    }
    set value(data) {
        if (typeof data !== "object" || !("modelNames" in data) || (this.showWeights && !("modelWeights" in data))) {
            throw new Error("modelNames or modelWeights not present in the data passed to the multi-model selector")
        }
        if (data.modelWeights && data.modelNames.length !== data.modelWeights.length) {
            throw new Error("Need to pass an equal number of modelNames and modelWeights!")
        }
        this.modelWeights = data.modelWeights || []
        this.modelNames = data.modelNames
        this.root.dataset.path = JSON.stringify(this.value)
    }
    get modelNames() {
        return this.getModelElements(true).map((e) => e.name.value)
    }
    set modelNames(names) {
        this.resizeEntryList(names.length)
        if (names.length === 0) this.getModelElements()[0].name.value = ""
        const els = this.getModelElements()
        names.forEach((n, i) => (els[i].name.value = n))
    }
    get modelWeights() {
        return this.getModelElements(true).map((e) => e.weight && e.weight.value)
    }
    set modelWeights(weights) {
        this.resizeEntryList(weights.length)
        if (weights.length === 0) this.getModelElements()[0].weight.value = this.defaultWeight
        const els = this.getModelElements()
        weights.forEach((w, i) => (els[i].weight.value = w))
    }
    resizeEntryList(n) {
        n = Math.max(1, n)
        while (this.length < n) this.addModelEntry()
        while (this.length > n) this.modelContainer.lastElementChild.remove()
    }
    addModelEntry() {
        const idx = this.counter++
        const row = document.createElement("div")
        row.className = "model_entry"
        const name = document.createElement("input")
        name.id = `${this.modelType}_${idx}`
        name.className = "model_name model-filter"
        name.dataset.path = ""
        row.appendChild(name)
        const weight = document.createElement("input")
        weight.className = "model_weight"
        weight.type = "number"
        weight.step = this.weightStep
        weight.value = this.defaultWeight
        row.appendChild(weight)
        this.modelContainer.appendChild(row)
        name.field = new ModelDropdown(name, this.modelType, "None")
    }
}

/* ---------------------------------------------------------------- main.js */

// Built when main.js runs (end of <body>), before getModels(); they fill in on "refreshModels".
let promptField = document.querySelector("#prompt")
let stableDiffusionModelField = new ModelDropdown(document.querySelector("#stable_diffusion_model"), "stable-diffusion")
let loraModelField = new MultiModelSelector(document.querySelector("#lora_model"), "lora", "LoRA", 0.5, 0.02)

// Bucket: ED's client for GET/POST /bucket/<path> (server: bucket_manager.py). store() uploads
// JSON.stringify(data) as "<path>.json"; retrieve() returns the parsed JSON or null.
const Bucket = {
    upload(path, blob) {
        __edRecord("Bucket.upload", [path])
        const formData = new FormData()
        formData.append("file", blob)
        return fetch(`bucket/${path}`, { method: "POST", body: formData })
    },
    getList(path) {
        return fetch(`bucket/${path}`).then((r) => (r.status == 200 ? r.json() : []))
    },
    store(path, data) {
        __edRecord("Bucket.store", [path, data])
        return Bucket.upload(`${path}.json`, JSON.stringify(data))
    },
    retrieve(path) {
        return fetch(`bucket/${path}.json`).then((r) => (r.status == 200 ? r.json() : null))
    },
}

var tabElements = []
function selectTab(tab_id) {
    __edRecord("selectTab", [tab_id])
    const info = tabElements.find((t) => t.tab.id == tab_id)
    if (!info.tab.classList.contains("active")) {
        tabElements.forEach((t) => {
            if (t.tab.classList.contains("active") && t.tab.parentNode === info.tab.parentNode) {
                t.tab.classList.toggle("active")
                t.content.classList.toggle("active")
            }
        })
        info.tab.classList.toggle("active")
        info.content.classList.toggle("active")
    }
    document.dispatchEvent(new CustomEvent("tabClick", { detail: info }))
}
function linkTabContents(tab) {
    const name = tab.id.replace("tab-", "")
    tabElements.push({ name, tab, content: document.getElementById(`tab-content-${name}`) })
    tab.addEventListener("click", () => selectTab(tab.id))
}
function isTabActive(tab) {
    return tab.classList.contains("active")
}

async function getAppConfig() {
    try {
        const res = await fetch("/get/app_config")
        return await res.json()
    } catch (e) {
        return {}
    }
}

/* ---------------------------------------------------------------- plugins.js */

const PLUGINS = { IMAGE_INFO_BUTTONS: [], GET_PROMPTS_HOOK: [], MODIFIERS_LOAD: [], TASK_CREATE: [] }

function loadScript(url) {
    const script = document.createElement("script")
    const promise = new Promise((resolve, reject) => {
        script.addEventListener("error", () => reject(new Error(`Script "${url}" couldn't be loaded.`)))
        script.addEventListener("load", () => resolve(url))
    })
    script.src = url + "?t=" + Date.now()
    document.head.appendChild(script)
    return promise
}

// GET /get/ui_plugins, then load every plugin in parallel (no order between plugins), like ED.
async function loadUIPlugins() {
    try {
        const res = await fetch("/get/ui_plugins")
        const plugins = await res.json()
        await Promise.allSettled(plugins.map(loadScript))
    } catch (e) {
        console.log("error fetching plugin paths", e)
    }
}

document.querySelector("#reload-models").addEventListener("click", (e) => {
    e.stopPropagation()
    getModels()
})
