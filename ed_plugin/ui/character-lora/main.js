// The tab's entry module (loaded by character-lora.plugin.js from the server plugin's /character-lora/ui/ route):
// the tab's state, connecting to the daemon, the form, the job panel, the previews and the job list.
import { VERSION, TAB_ID, INFO_URL, START_URL, MIN_IMAGES, MAX_IMAGES, MIN_SIDE, MAX_ASPECT, BUCKET_STEP, CONTROL_RE, DEFAULT_LORA_WEIGHT, MAX_LOG_LINES, NAME_RE, TRIGGER_RE, ACTIVE, STATE_LABELS, ARCH_LABELS, PARAM_FIELDS, SAMPLE_NAME_RE } from "./constants.js"
import { ed } from "./ed.js"
import { el, icon, toast } from "./dom.js"
import { fmtDuration, fmtRate, fmtTime, isFinished, sleep, archFromTags } from "./format.js"
import { loadHandled, saveHandled } from "./handled.js"
import { DaemonClient } from "./api.js"

// ------------------------------------------------------------------ state

const client = new DaemonClient()
const state = {
    info: null,
    health: "unknown", // unknown | checking | ok | down
    problems: [], // [{title, detail, fix, actions}]
    ready: null, // result of /config/test
    presets: {},
    defaultPreset: "balanced",
    daemonModels: null, // [{id, file, arch}]
    supportedArchs: ["sd1"],
    jobs: new Map(),
    selectedId: null,
    userSelected: false,
    handled: loadHandled(),
    images: [], // {id, file, url, width, height, problem}
    imageSeq: 0,
    submitting: false,
    paramsDirty: new Set(),
    baseModelTouched: false,
    lastSeq: null,
    connectGen: 0,
    pollTimer: null,
    wsStatus: "offline",
}
const ui = {}

// ------------------------------------------------------------------ connecting

async function connect() {
    const gen = ++state.connectGen
    clearTimeout(state.pollTimer)
    state.health = "checking"
    renderBanner()

    let info
    try {
        const res = await fetch(INFO_URL, { cache: "no-store" })
        if (res.status === 404) {
            return fail(gen, [
                {
                    title: "The Character LoRA server plugin is not loaded in Easy Diffusion.",
                    fix: "Run install_plugin.py, then restart Easy Diffusion (server plugins load at start-up).",
                },
            ])
        }
        if (!res.ok) {
            return fail(gen, [
                {
                    title: "Easy Diffusion answered " + res.status + " to " + INFO_URL + ".",
                    fix: "See Easy Diffusion's console for the Character LoRA plugin's error, then press Retry.",
                },
            ])
        }
        info = await res.json()
    } catch (e) {
        return fail(gen, [
            {
                title: "Easy Diffusion did not answer " + INFO_URL + ".",
                fix: "Check that Easy Diffusion is running, then press Retry.",
            },
        ])
    }
    if (gen !== state.connectGen) return
    state.info = info
    const daemon = info.daemon || {}
    client.configure(pageReachableUrl(daemon), daemon.token)
    const problems = (info.problems || []).map((p) => ({ title: p.error, fix: p.fix }))

    // is this page allowed by the daemon's CORS list?
    const origins = Array.isArray(daemon.allowed_origins) ? daemon.allowed_origins.map((o) => o.replace(/\/+$/, "")) : null
    const originBlocked = !!origins && !origins.includes(window.location.origin)
    if (originBlocked) {
        problems.push({
            title: "The daemon does not accept calls from this page's address (" + window.location.origin + ").",
            fix:
                "Add " + window.location.origin + " to allowed_origins in " + (daemon.config_path || "the daemon config") +
                " and restart the daemon, or open Easy Diffusion at http://localhost:" + (window.location.port || "9000") + ".",
        })
    }

    try {
        await client.request("GET", "/health", null, { auth: false, timeoutMs: 4000 })
    } catch (e) {
        if (gen !== state.connectGen) return
        if (!(originBlocked && daemon.running)) problems.push(unreachableProblem(daemon, e))
        return fail(gen, problems, { retrySoon: true })
    }
    if (!daemon.token) {
        return fail(gen, problems.length ? problems : [{ title: "The daemon token is not known.", fix: "Run install_plugin.py again." }])
    }

    let test, presets, models
    try {
        ;[test, presets, models] = await Promise.all([
            client.request("POST", "/config/test", null, { timeoutMs: 30000 }),
            client.request("GET", "/presets"),
            client.request("GET", "/models").catch(() => null),
        ])
    } catch (e) {
        if (gen !== state.connectGen) return
        problems.push(requestProblem(e, daemon))
        return fail(gen, problems, { retrySoon: e.kind === "network" })
    }
    if (gen !== state.connectGen) return
    state.presets = (presets && presets.presets) || {}
    state.defaultPreset = (presets && presets.default) || Object.keys(state.presets)[0] || "balanced"
    state.daemonModels = models && Array.isArray(models.models) ? models.models : null
    if (models && Array.isArray(models.supported_archs)) state.supportedArchs = models.supported_archs
    state.ready = { ...test, ready: isReady(test) }
    for (const c of blockingChecks(test)) {
        problems.push({ title: c.name + ": " + (c.detail || "not ready"), fix: c.fix })
    }
    state.problems = problems
    state.health = "ok"
    renderPresets()
    renderBaseModels()
    renderBanner()
    await refreshJobs()
    client.socket.open()
    renderAll()
}

/** Failing checks that stop training. The tab always sends a base model, so the daemon's "no default
    base_model" check does not matter while the daemon sees models in ED's folder. */
function blockingChecks(test) {
    const haveModels = !!(state.daemonModels && state.daemonModels.length)
    return (test.checks || []).filter((c) => !c.ok && !(c.name === "base_model" && haveModels))
}

function isReady(test) {
    return !!test && (test.ready || blockingChecks(test).length === 0)
}

function fail(gen, problems, { retrySoon = false } = {}) {
    if (gen !== state.connectGen) return
    state.health = "down"
    state.problems = problems
    state.ready = null
    renderAll()
    if (retrySoon) {
        // the daemon may still be starting (autostart): try again quietly
        const delay = state.info && state.info.daemon && state.info.daemon.start && state.info.daemon.start.state === "starting" ? 2000 : 8000
        state.pollTimer = setTimeout(() => {
            if (gen === state.connectGen) connect()
        }, delay)
    }
}

/** The daemon's URL as this browser reaches it (a daemon on 0.0.0.0 is reached through ED's host name). */
function pageReachableUrl(daemon) {
    const url = daemon.url
    if (!url) return null
    const listenAll = daemon.listen_host === "0.0.0.0" || daemon.listen_host === "::"
    const pageHost = window.location.hostname
    const local = ["localhost", "127.0.0.1", "[::1]", "::1"]
    if (listenAll && !local.includes(pageHost)) {
        try {
            const u = new URL(url)
            u.hostname = pageHost
            return u.toString()
        } catch (e) {
            return url
        }
    }
    return url
}

function unreachableProblem(daemon, err) {
    const start = daemon.start || {}
    const local = ["localhost", "127.0.0.1", "[::1]", "::1"]
    if (daemon.running) {
        return {
            title: "The daemon is running, but this page may not call it (" + window.location.origin + ").",
            fix:
                "Add " + window.location.origin + " to allowed_origins in " + (daemon.config_path || "the daemon config") +
                ", then restart the daemon (or run install_plugin.py again).",
        }
    }
    if (!local.includes(window.location.hostname) && !["0.0.0.0", "::"].includes(daemon.listen_host)) {
        return {
            title: "Easy Diffusion is opened from another computer, but the daemon only listens on " + (daemon.listen_host || "127.0.0.1") + ".",
            fix: "Open Easy Diffusion on the computer that runs it (http://localhost:" + (window.location.port || "9000") + "), or set host: 0.0.0.0 in the daemon config and add this address to allowed_origins.",
        }
    }
    let fix
    if (start.state === "starting" || start.state === "checking") {
        return { title: "The training daemon is starting…", fix: "This takes a few seconds; the tab connects by itself.", waiting: true }
    } else if (start.state === "failed" || start.state === "exited") {
        fix = (start.error || "Starting it failed.") + (start.log ? " Log: " + start.log + "." : "") + " Fix the problem, then press Start daemon."
    } else if (daemon.can_start) {
        fix = "Press Start daemon, or run: " + daemon.start_command
    } else {
        fix = "Start it (python -m daemon --config <config>) or run install_plugin.py, then press Retry."
    }
    return {
        title: "The training daemon is not running at " + (client.url || daemon.url || "its address") + ".",
        fix,
        canStart: !!daemon.can_start,
    }
}

function requestProblem(err, daemon) {
    if (err.status === 401) {
        return {
            title: "The daemon refused the token (" + err.message + ")",
            fix: "The token in " + (daemon.config_path || "the daemon config") + " changed: restart the daemon, then press Retry.",
        }
    }
    if (err.status === 403) {
        return { title: err.message, fix: err.hint || "Add this page's address to allowed_origins in the daemon config." }
    }
    if (err.kind === "network") return unreachableProblem(daemon || {}, err)
    return { title: err.message, fix: err.hint || "See the daemon's console output." }
}

async function startDaemon() {
    ui.bannerStart && (ui.bannerStart.disabled = true)
    try {
        const res = await fetch(START_URL, { method: "POST", cache: "no-store" })
        const data = await res.json().catch(() => ({}))
        if (!res.ok) {
            toast((data.start && data.start.error) || data.error || "The daemon could not be started.", true)
        }
    } catch (e) {
        toast("Easy Diffusion did not answer " + START_URL + ".", true)
    }
    await sleep(1500)
    connect()
}

async function refreshJobs() {
    try {
        const data = await client.request("GET", "/jobs")
        mergeSnapshot((data && data.jobs) || [])
    } catch (e) {
        /* the WebSocket snapshot will do */
    }
}

// ------------------------------------------------------------------ WebSocket frames

client.socket.addEventListener("open", () => {
    state.wsStatus = "live"
    renderConnection()
    refreshJobs() // catch up on anything missed while disconnected
})
client.socket.addEventListener("close", (ev) => {
    state.wsStatus = "reconnecting"
    renderConnection()
    if (ev.detail && ev.detail.wasConnected) {
        // the daemon may have gone away: re-check (banner) without dropping the jobs we show
        setTimeout(() => {
            if (!client.socket.connected) checkHealthQuietly()
        }, 1500)
    }
})
client.socket.addEventListener("frame", (ev) => handleFrame(ev.detail))

async function checkHealthQuietly() {
    try {
        await client.request("GET", "/health", null, { auth: false, timeoutMs: 3000 })
    } catch (e) {
        connect() // re-reads /character-lora/info (start state, running) and shows what is wrong
    }
}

function handleFrame(frame) {
    if (typeof frame.seq === "number") {
        if (state.lastSeq !== null && frame.type !== "snapshot" && frame.seq > state.lastSeq + 1) {
            refreshJobs() // a gap: fetch the truth
        }
        state.lastSeq = frame.seq
    }
    const data = frame.data || {}
    const id = frame.job_id
    if (state.health !== "ok" && frame.type === "snapshot") {
        // the socket is back although the last health check failed: re-run the checks
        connect()
    }
    switch (frame.type) {
        case "snapshot":
            mergeSnapshot(data.jobs || [])
            break
        case "job_created":
            upsertJob(data)
            if (!state.userSelected) state.selectedId = data.id
            break
        case "state":
        case "result": {
            const job = jobOrFetch(id)
            if (!job) break
            for (const k of ["state", "error", "artifact", "lora_id"]) if (k in data) job[k] = data[k]
            if (frame.ts) job.updated_at = frame.ts
            if (frame.type === "result" || isFinished(job)) onFinished(job, true)
            break
        }
        case "progress": {
            const job = jobOrFetch(id)
            if (job) job.progress = Object.assign({}, job.progress || {}, data)
            break
        }
        case "log": {
            const job = jobOrFetch(id)
            if (job) {
                job.logs = (job.logs || []).concat(data.lines || []).slice(-MAX_LOG_LINES)
            }
            break
        }
        case "checkpoint": {
            const job = jobOrFetch(id)
            if (job) job.checkpoints = (job.checkpoints || []).concat([data.file])
            break
        }
        case "sample": {
            const job = jobOrFetch(id)
            if (job && data.url) job.samples = mergeSamples(job.samples, [{ file: data.file, url: data.url }])
            break
        }
        case "job_deleted":
            state.jobs.delete(id)
            if (state.selectedId === id) {
                state.selectedId = null
                state.userSelected = false
            }
            break
        default:
            break
    }
    scheduleRender()
}

function jobOrFetch(id) {
    const job = id && state.jobs.get(id)
    if (job) return job
    if (id) {
        client
            .request("GET", "/jobs/" + encodeURIComponent(id) + "/status")
            .then((j) => {
                upsertJob(j)
                if (isFinished(j)) onFinished(j, true)
                scheduleRender()
            })
            .catch(() => {})
    }
    return null
}

function upsertJob(job) {
    if (!job || !job.id) return
    const prev = state.jobs.get(job.id)
    if (prev && prev.checkpoints && !job.checkpoints) job.checkpoints = prev.checkpoints
    // a job's previews only grow: keep one a `sample` frame brought that an older answer lacks
    job.samples = mergeSamples(job.samples, prev && prev.samples)
    state.jobs.set(job.id, job)
}

/** `base` (the daemon's order, oldest first) plus any of `extra` it lacks, by url. */
function mergeSamples(base, extra) {
    const out = Array.isArray(base) ? base.filter((s) => s && s.url) : []
    const urls = new Set(out.map((s) => s.url))
    for (const s of Array.isArray(extra) ? extra : []) {
        if (s && s.url && !urls.has(s.url)) {
            urls.add(s.url)
            out.push(s)
        }
    }
    return out
}

/** A full list of jobs (WebSocket snapshot or GET /jobs): the daemon's word replaces ours. */
function mergeSnapshot(jobs) {
    const ids = new Set()
    for (const job of jobs) {
        ids.add(job.id)
        upsertJob(job)
    }
    for (const id of Array.from(state.jobs.keys())) if (!ids.has(id)) state.jobs.delete(id)
    // jobs that finished while this page was closed or disconnected
    const missed = jobs.filter((j) => j.state === "done" && j.lora_id && !state.handled.has(j.id))
    if (missed.length) finishQuietly(missed)
    scheduleRender()
}

// ------------------------------------------------------------------ when a job is done

const finishing = new Set()

async function onFinished(job, live) {
    if (job.state !== "done") {
        if (live && !state.handled.has(job.id) && job.state === "error") {
            state.handled.add(job.id)
            saveHandled(state.handled)
            toast("Training “" + job.name + "” failed: " + ((job.error && job.error.message) || "see the log"), true)
        }
        return
    }
    if (state.handled.has(job.id) || finishing.has(job.id) || !job.lora_id) return
    finishing.add(job.id)
    try {
        await refreshEdModels()
        await storeKeywords(job)
        state.handled.add(job.id)
        saveHandled(state.handled)
        const listed = edKnowsLora(job.lora_id)
        if (listed === false) {
            toast(
                "“" + job.name + "” is trained, but Easy Diffusion does not list " + job.lora_id +
                    " yet. Check that the daemon's LoRA folder is Easy Diffusion's models/lora.",
                true
            )
        } else {
            toast("Your LoRA “" + job.name + "” is ready. Trigger word: " + job.trigger + ".")
        }
    } finally {
        finishing.delete(job.id)
        scheduleRender()
    }
}

async function finishQuietly(jobs) {
    const todo = jobs.filter((j) => !finishing.has(j.id))
    if (!todo.length) return
    todo.forEach((j) => finishing.add(j.id))
    try {
        await refreshEdModels()
        for (const job of todo) {
            await storeKeywords(job)
            state.handled.add(job.id)
        }
        saveHandled(state.handled)
        const recent = todo.filter((j) => Date.now() / 1000 - (j.updated_at || 0) < 3600)
        if (recent.length) {
            toast(
                recent.length === 1
                    ? "Your LoRA “" + recent[0].name + "” finished training and is ready to use."
                    : recent.length + " character LoRAs finished training and are ready to use."
            )
        }
    } finally {
        todo.forEach((j) => finishing.delete(j.id))
        scheduleRender()
    }
}

async function refreshEdModels() {
    const fn = ed.getModels()
    if (!fn) return
    try {
        await fn()
    } catch (e) {
        console.warn("[Character LoRA] getModels failed", e)
    }
}

function edKnowsLora(id) {
    const db = ed.modelsDB()
    if (!db) return null
    return !!(db.lora && Object.prototype.hasOwnProperty.call(db.lora, id))
}

/** Add the trigger word to the LoRA's keywords in ED's Bucket, keeping whatever is already there. */
async function storeKeywords(job) {
    const bucket = ed.bucket()
    if (!bucket || !job.lora_id || !job.trigger) return
    const path = "modelinfo/lora/" + job.lora_id
    try {
        let info = null
        try {
            info = await bucket.retrieve(path)
        } catch (e) {
            info = null
        }
        info = info && typeof info === "object" ? info : {}
        const keywords = Array.isArray(info.keywords) ? info.keywords.slice() : []
        if (keywords.includes(job.trigger)) return
        keywords.unshift(job.trigger)
        const record = Object.assign({}, info, {
            keywords,
            notes: info.notes || "Character LoRA for " + job.name + " (class: " + (job.class_token || "person") + "), trained with Character LoRA One-Click.",
            civitai: info.civitai === undefined ? null : info.civitai,
        })
        const res = await bucket.store(path, record)
        if (res && res.ok === false) {
            // ED's POST /bucket saves, then fails building its answer on Python >= 3.9
            // (base64.encodestring): check what was stored instead of trusting the status
            const back = await bucket.retrieve(path).catch(() => null)
            if (!back || !Array.isArray(back.keywords) || !back.keywords.includes(job.trigger)) {
                throw new Error("HTTP " + res.status)
            }
        }
    } catch (e) {
        console.warn("[Character LoRA] could not store the keywords", e)
    }
}

/** "Use it": select the LoRA in ED, put the trigger word into the prompt, go to the Generate tab. */
async function useLora(job) {
    if (!job || !job.lora_id) return
    if (edKnowsLora(job.lora_id) !== true) await refreshEdModels()
    const field = ed.loraField()
    let selected = false
    if (field) {
        try {
            const cur = field.value || { modelNames: [], modelWeights: [] }
            const names = []
            const weights = []
            ;(cur.modelNames || []).forEach((n, i) => {
                if (!n) return
                names.push(n)
                weights.push(cur.modelWeights ? cur.modelWeights[i] : DEFAULT_LORA_WEIGHT)
            })
            if (!names.includes(job.lora_id)) {
                names.push(job.lora_id)
                weights.push(DEFAULT_LORA_WEIGHT)
            }
            field.value = { modelNames: names, modelWeights: weights }
            selected = (field.value.modelNames || []).includes(job.lora_id)
        } catch (e) {
            console.warn("[Character LoRA] could not set the LoRA field", e)
        }
    }
    const prompt = ed.promptField()
    if (prompt) {
        const text = prompt.value || ""
        const escaped = job.trigger.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
        if (!new RegExp("(^|[\\s,(])" + escaped + "($|[\\s,):])").test(text)) {
            prompt.value = text.trim()
                ? job.trigger + ", " + text
                : "a photo of " + job.trigger + " " + (job.class_token || "person")
            prompt.dispatchEvent(new Event("input", { bubbles: true }))
            prompt.dispatchEvent(new Event("change", { bubbles: true }))
        }
    }
    const select = ed.selectTab()
    if (select && document.getElementById("tab-main")) select("tab-main")
    if (selected) {
        toast("Selected LoRA " + job.lora_id + " (weight " + DEFAULT_LORA_WEIGHT + ") and added “" + job.trigger + "” to the prompt.")
    } else {
        toast("Easy Diffusion does not list the LoRA " + job.lora_id + " yet; click the reload button next to the model list, then pick it under LoRA.", true)
    }
}

// ------------------------------------------------------------------ form logic

function validateName(v) {
    v = v.trim()
    if (!v) return "Give the character a name."
    if (!NAME_RE.test(v)) return "Use 1–64 letters, digits, spaces, - or _."
    return null
}

function validateTrigger(v) {
    v = v.trim()
    if (!v) return "Give a trigger word, e.g. ohwx (a word the model does not know yet)."
    if (/\s/.test(v)) return "The trigger word cannot contain spaces."
    if (v.includes(",")) return "The trigger word cannot contain commas."
    if (CONTROL_RE.test(v)) return "The trigger word cannot contain control or invisible characters."
    if (v.startsWith("-")) return "The trigger word cannot start with '-'."
    if (!TRIGGER_RE.test(v)) return "Use at most 32 characters."
    return null
}

function validateClass(v) {
    v = v.replace(/\s+/g, " ").trim()
    if (!v) return null
    if (v.includes(",")) return "The class word cannot contain commas."
    if (CONTROL_RE.test(v)) return "The class word cannot contain control or invisible characters."
    if (v.startsWith("-") || v.includes("--")) return "The class word cannot start with '-' or contain '--'."
    if (v.length > 40) return "Use at most 40 characters."
    return null
}

function imagesProblem() {
    const bad = state.images.filter((i) => i.problem)
    if (bad.length) return bad.length === 1 ? "Remove “" + bad[0].file.name + "”: " + bad[0].problem : "Remove the " + bad.length + " pictures marked in red."
    const pending = state.images.filter((i) => !i.checked)
    const n = state.images.length
    if (n < MIN_IMAGES) {
        return n === 0
            ? "Add " + MIN_IMAGES + " to " + MAX_IMAGES + " pictures of the character."
            : "Add at least " + (MIN_IMAGES - n) + " more picture" + (MIN_IMAGES - n === 1 ? "" : "s") + " (" + MIN_IMAGES + "–" + MAX_IMAGES + " needed)."
    }
    if (n > MAX_IMAGES) return "Remove " + (n - MAX_IMAGES) + " picture" + (n - MAX_IMAGES === 1 ? "" : "s") + ": at most " + MAX_IMAGES + " are used."
    if (pending.length) return "Checking the pictures…"
    return null
}

function selectedBaseModel() {
    return ui.baseModel ? ui.baseModel.value : ""
}

function baseModelArch(id) {
    if (!id) return null
    const db = ed.modelsDB()
    const entry = db && db["stable-diffusion"] && db["stable-diffusion"][id]
    let arch = entry ? archFromTags(entry.tags) : null
    if (!arch && state.daemonModels) {
        const m = state.daemonModels.find((x) => x.id === id)
        if (m) arch = m.arch
    }
    return arch || "unknown"
}

function archProblem(arch) {
    if (!arch || arch === "unknown") return null
    if (state.supportedArchs.includes(arch)) return null
    const label = ARCH_LABELS[arch] || arch.replace(/^other:/, "")
    return label + " models cannot be trained yet; pick an SD 1.x model."
}

function formErrors() {
    return {
        name: validateName(ui.name.value),
        trigger: validateTrigger(ui.trigger.value),
        class_token: validateClass(ui.classWord.value),
        base_model: archProblem(baseModelArch(selectedBaseModel())),
    }
}

function startBlocker() {
    if (state.submitting) return "Uploading…"
    if (state.health !== "ok") return "The daemon is not reachable (see the message above)."
    if (state.ready && !state.ready.ready) return "The daemon is not ready (see the message above)."
    const errs = formErrors()
    const labels = { name: "name", trigger: "trigger word", class_token: "class word", base_model: "base model" }
    // an empty field says what to type; "Fix … first" is for a value that is there but wrong
    const whenEmpty = { name: ["Type a character name.", ui.name], trigger: ["Type a trigger word.", ui.trigger] }
    for (const k of Object.keys(errs)) {
        if (!errs[k]) continue
        if (whenEmpty[k] && !whenEmpty[k][1].value.trim()) return whenEmpty[k][0]
        return "Fix the " + labels[k] + " first."
    }
    const img = imagesProblem()
    if (img) return img
    const p = paramsProblem()
    if (p) return p
    return null
}

function presetValues() {
    return state.presets[ui.preset && ui.preset.value] || {}
}

function readParam(f) {
    const input = ui.params[f.key]
    const raw = input.value.trim()
    if (raw === "") return undefined
    const num = Number(raw)
    return num
}

function paramsProblem() {
    const issue = paramsIssue()
    return issue ? issue.text : null
}

/** The first changed Advanced value the daemon would refuse: {key, text}, or null. */
function paramsIssue() {
    for (const f of PARAM_FIELDS) {
        if (!state.paramsDirty.has(f.key)) continue
        const v = readParam(f)
        if (v === undefined) continue
        const bad = (text) => ({ key: f.key, text })
        if (!isFinite(v) || (f.type === "int" && !Number.isInteger(v))) return bad(f.label + " must be a " + (f.type === "int" ? "whole " : "") + "number.")
        if (f.min !== undefined && v < f.min) return bad(f.label + " must be at least " + f.min + ".")
        if (f.max !== undefined && v > f.max) return bad(f.label + " must be at most " + f.max + ".")
        if (f.key === "resolution" && v % 64) return bad("Resolution must be a multiple of 64.")
    }
    // the daemon refuses a sent preview interval longer than the run (400, key sample_every_n_epochs)
    if (state.paramsDirty.has("sample_every_n_epochs")) {
        const v = readParam({ key: "sample_every_n_epochs" })
        const epochs = effectiveEpochs()
        if (v !== undefined && epochs && v > epochs) {
            return { key: "sample_every_n_epochs", text: "Preview every N epochs must be from 0 (off) to the number of epochs (" + epochs + ")." }
        }
    }
    return null
}

function effectiveEpochs() {
    const v = state.paramsDirty.has("epochs") ? readParam({ key: "epochs" }) : undefined
    return v !== undefined && Number.isInteger(v) && v >= 1 ? v : presetValues().epochs
}

/** The daemon trains on the CPU (no CUDA GPU, allow_cpu): /config/test says so in `device`. */
function trainsOnCpu() {
    return !!(state.ready && state.ready.device === "cpu")
}

/** What an unchanged Advanced field shows: what the daemon will use when the key is not sent. */
function paramDefault(f) {
    const p = presetValues()
    let v = p[f.key]
    if (f.key === "sample_every_n_epochs") {
        // the daemon turns previews off on a CPU, and drops an interval the run never reaches
        if (trainsOnCpu()) v = 0
        const epochs = effectiveEpochs()
        if (typeof v === "number" && epochs && v > epochs) v = 0
    }
    return v === undefined || v === null ? "" : String(v)
}

function collectParams() {
    const params = { preset: ui.preset.value || state.defaultPreset }
    for (const f of PARAM_FIELDS) {
        if (!state.paramsDirty.has(f.key)) continue
        const v = readParam(f)
        if (v !== undefined) params[f.key] = v
    }
    return params
}

function autoRepeats(n) {
    return Math.max(1, Math.min(100, Math.round(200 / Math.max(1, n))))
}

// kohya's bucket for a picture with bucket_no_upscale, as daemon/pipeline/buckets.py computes it: a picture
// larger than resolution² is scaled down keeping its shape (one side on the step), then both sides are
// rounded down to the step. Batches never mix buckets, so the step count is counted per bucket.
function bucketOf(width, height, resolution) {
    const roundToSteps = (x) => { const r = Math.floor(x + 0.5); return r - (r % BUCKET_STEP) }
    let w = width, h = height
    const maxArea = resolution * resolution
    if (w * h > maxArea) {
        const aspect = w / h
        const rw = Math.sqrt(maxArea * aspect)
        const rh = maxArea / rw
        const wRounded = roundToSteps(rw)
        const hInW = roundToSteps(wRounded / aspect)
        const hRounded = roundToSteps(rh)
        const wInH = roundToSteps(hRounded * aspect)
        if (hInW && Math.abs(wRounded / hInW - aspect) < Math.abs(wInH / hRounded - aspect)) {
            w = wRounded; h = Math.floor(wRounded / aspect + 0.5)
        } else {
            w = Math.floor(hRounded * aspect + 0.5); h = hRounded
        }
    }
    return (w - (w % BUCKET_STEP)) + "x" + (h - (h % BUCKET_STEP))
}

function estimateSteps() {
    const p = presetValues()
    const val = (k) => (state.paramsDirty.has(k) && readParam({ key: k }) !== undefined ? readParam({ key: k }) : p[k])
    const n = state.images.length || MIN_IMAGES
    const repeats = state.paramsDirty.has("repeats") && readParam({ key: "repeats" }) ? readParam({ key: "repeats" }) : autoRepeats(n)
    const epochs = val("epochs")
    const batch = val("batch_size") || 1
    const resolution = val("resolution")
    if (!epochs) return null
    const sized = state.images.length && resolution && state.images.every((i) => i.width && i.height)
    if (!sized) return Math.ceil((n * repeats) / batch) * epochs
    const counts = {}
    for (const img of state.images) {
        const key = bucketOf(img.width, img.height, resolution)
        counts[key] = (counts[key] || 0) + 1
    }
    let perEpoch = 0
    for (const count of Object.values(counts)) perEpoch += Math.ceil((count * repeats) / batch)
    return perEpoch * epochs
}

async function submit() {
    const blocker = startBlocker()
    if (blocker) return
    clearServerErrors()
    state.submitting = true
    renderForm()
    const form = new FormData()
    form.append("name", ui.name.value.trim())
    form.append("trigger", ui.trigger.value.trim())
    const cls = ui.classWord.value.replace(/\s+/g, " ").trim()
    if (cls) form.append("class_token", cls)
    if (selectedBaseModel()) form.append("base_model", selectedBaseModel())
    form.append("params", JSON.stringify(collectParams()))
    for (const img of state.images) form.append("images", img.file, img.file.name)
    try {
        const res = await client.request("POST", "/train", form, { timeoutMs: 300000 })
        state.selectedId = res.job_id
        state.userSelected = false
        if (!state.jobs.has(res.job_id)) {
            state.jobs.set(res.job_id, {
                id: res.job_id,
                name: ui.name.value.trim(),
                trigger: ui.trigger.value.trim(),
                class_token: cls || "person",
                state: res.state || "queued",
                progress: {},
                logs: [],
                image_count: state.images.length,
                created_at: Date.now() / 1000,
            })
        }
        clearImages()
        toast("Training of “" + ui.name.value.trim() + "” started.")
    } catch (e) {
        showServerError(e)
    } finally {
        state.submitting = false
        renderAll()
    }
}

function clearServerErrors() {
    for (const node of Object.values(ui.serverErrors)) node.textContent = ""
    ui.startError.textContent = ""
}

function showServerError(e) {
    let key = (e.key || "").replace(/^params\./, "")
    const text = e.message + (e.hint ? " " + e.hint : "")
    if (e.status === 413) key = "images"
    if (key && ui.serverErrors[key]) {
        ui.serverErrors[key].textContent = text
        if (ui.params[key]) ui.advanced.open = true
    } else if (key && ui.params[key]) {
        ui.advanced.open = true
        ui.serverErrors.params.textContent = text
    } else if (key === "images" || (key && key.startsWith("images"))) {
        ui.serverErrors.images.textContent = text
    } else {
        ui.startError.textContent = text
    }
    if (e.kind === "network") checkHealthQuietly()
}

// images -----------------------------------------------------------

function addFiles(fileList) {
    const rejected = []
    for (const file of Array.from(fileList || [])) {
        if (!file.type || !file.type.startsWith("image/")) {
            rejected.push(file.name)
            continue
        }
        const dup = state.images.some((i) => i.file.name === file.name && i.file.size === file.size && i.file.lastModified === file.lastModified)
        if (dup) continue
        const img = { id: ++state.imageSeq, file, url: URL.createObjectURL(file), checked: false, problem: null }
        state.images.push(img)
        probeImage(img)
    }
    ui.imageNote.textContent = rejected.length
        ? "Skipped " + rejected.length + " file" + (rejected.length === 1 ? "" : "s") + " that " + (rejected.length === 1 ? "is" : "are") + " not a picture: " + rejected.slice(0, 3).join(", ") + (rejected.length > 3 ? "…" : "")
        : ""
    ui.serverErrors.images.textContent = ""
    renderImages()
    renderForm()
}

function probeImage(img) {
    const probe = new Image()
    probe.onload = () => {
        img.checked = true
        img.width = probe.naturalWidth
        img.height = probe.naturalHeight
        if (Math.min(img.width, img.height) < MIN_SIDE) img.problem = "only " + img.width + "×" + img.height + " px (at least " + MIN_SIDE + " a side)"
        else if (Math.max(img.width, img.height) > MAX_ASPECT * Math.min(img.width, img.height)) img.problem = img.width + "×" + img.height + " px, more elongated than 1:" + MAX_ASPECT
        renderImages()
        renderForm()
    }
    probe.onerror = () => {
        img.checked = true
        img.problem = "the browser cannot read it as a picture"
        renderImages()
        renderForm()
    }
    probe.src = img.url
}

function removeImage(id) {
    const idx = state.images.findIndex((i) => i.id === id)
    if (idx < 0) return
    URL.revokeObjectURL(state.images[idx].url)
    state.images.splice(idx, 1)
    ui.serverErrors.images.textContent = ""
    renderImages()
    renderForm()
}

function clearImages() {
    state.images.forEach((i) => URL.revokeObjectURL(i.url))
    state.images = []
    ui.imageNote.textContent = ""
    renderImages()
}

// ------------------------------------------------------------------ building the tab

const CSS = `
#${TAB_ID}.tab-content-inner { max-width: 1180px; text-align: left; }
.clora-root { display: flex; flex-direction: column; gap: 12px; }
.clora-header { display: flex; align-items: center; justify-content: space-between; gap: 8px; flex-wrap: wrap; }
.clora-header h3 { margin: 0; font-weight: normal; }
.clora-conn { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-conn .clora-dot { display: inline-block; width: 8px; height: 8px; border-radius: 50%; margin-right: 5px; background: var(--status-orange, orange); }
.clora-conn[data-status="live"] .clora-dot { background: var(--status-green, green); }
.clora-conn[data-status="offline"] .clora-dot { background: var(--status-red, red); }
.clora-banner { border-radius: 7px; padding: 10px 12px; border: 1px solid var(--status-red, red); background: var(--background-color3); }
.clora-banner.clora-waiting { border-color: var(--status-orange, orange); }
.clora-banner h4 { margin: 0 0 6px 0; }
.clora-banner ul { margin: 0 0 8px 0; padding-left: 18px; }
.clora-banner li { margin-bottom: 6px; }
.clora-banner .clora-fix { display: block; color: var(--small-label-color, #aaa); font-size: 10pt; margin-top: 2px; word-break: break-word; }
.clora-banner button { margin-right: 6px; }
.clora-columns { display: grid; grid-template-columns: minmax(320px, 1fr) minmax(320px, 1fr); gap: 12px; align-items: start; }
@media (max-width: 900px) { .clora-columns { grid-template-columns: 1fr; } }
.clora-root .panel-box { margin-bottom: 0; padding: 10px 12px; }
.clora-root .panel-box > h4 { margin: 0 0 10px 0; display: flex; align-items: center; gap: 6px; }
.clora-field { display: grid; grid-template-columns: 120px 1fr; gap: 2px 10px; align-items: center; margin-bottom: 8px; }
.clora-field > label { text-align: right; }
.clora-field input, .clora-field select, .clora-adv input {
width: 100%; padding: 4px 6px; color: var(--input-text-color);
background: var(--input-background-color); border: var(--input-border-size, 1px) solid var(--input-border-color);
border-radius: var(--input-border-radius, 4px); font-size: 10pt; }
.clora-field input[aria-invalid="true"] { border-color: var(--status-red, red); }
.clora-help, .clora-err, .clora-arch { grid-column: 2; font-size: 9pt; min-height: 0; }
.clora-help, .clora-arch { color: var(--small-label-color, #999); }
.clora-err { color: #ff6b6b; }
.clora-err:empty, .clora-help:empty { display: none; }
.clora-arch.clora-warn { color: var(--status-orange, orange); }
.clora-root details { margin: 4px 0 10px 0; }
.clora-root summary { cursor: pointer; color: var(--small-label-color, #aaa); }
.clora-adv { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; margin-top: 8px; }
.clora-adv label { display: block; font-size: 9pt; color: var(--small-label-color, #aaa); margin-bottom: 2px; }
.clora-adv input.clora-dirty { border-color: var(--accent-color); }
.clora-adv input[aria-invalid="true"] { border-color: var(--status-red, red); }
.clora-root details > .clora-err { margin-top: 6px; }
.clora-drop { border: 2px dashed var(--background-color4); border-radius: 7px; padding: 14px; text-align: center; cursor: pointer;
background: var(--background-color3); color: var(--small-label-color, #aaa); transition: border-color 0.15s, background 0.15s; }
.clora-drop:hover, .clora-drop.clora-over { border-color: var(--accent-color); background: var(--background-color1); color: var(--text-color); }
.clora-drop i { font-size: 20px; display: block; margin-bottom: 4px; }
.clora-thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(72px, 1fr)); gap: 6px; margin-top: 8px; }
.clora-thumb { position: relative; aspect-ratio: 1; border-radius: 5px; overflow: hidden; background: var(--background-color4); border: 2px solid transparent; }
.clora-thumb.clora-bad { border-color: var(--status-red, red); }
.clora-thumb img { width: 100%; height: 100%; object-fit: cover; display: block; }
.clora-thumb button { position: absolute; top: 2px; right: 2px; width: 20px; height: 20px; padding: 0; border-radius: 50%; font-size: 10px; line-height: 20px; opacity: 0.85; }
.clora-count { display: flex; justify-content: space-between; margin-top: 6px; font-size: 10pt; }
.clora-count b[data-ok="true"] { color: #5fbf5f; }
.clora-count b[data-ok="false"] { color: var(--status-orange, orange); }
.clora-start { display: flex; align-items: center; gap: 10px; margin-top: 12px; flex-wrap: wrap; }
.clora-start .primaryButton { font-size: 11pt; padding: 6px 14px; border-radius: var(--input-border-radius, 4px); }
.clora-start .primaryButton:disabled { opacity: 0.45; cursor: not-allowed; }
.clora-start .clora-reason { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 9pt; background: var(--background-color4); white-space: nowrap; }
.clora-badge[data-state="prepping"], .clora-badge[data-state="training"], .clora-badge[data-state="copying"] { background: var(--accent-color); color: var(--accent-text-color); }
.clora-badge[data-state="done"] { background: #2e7d32; color: #fff; }
.clora-badge[data-state="error"] { background: #b3261e; color: #fff; }
.clora-badge[data-state="cancelled"], .clora-badge[data-state="interrupted"] { background: var(--status-orange, orange); color: #000; }
.clora-job-title { display: flex; justify-content: space-between; align-items: center; gap: 8px; margin-bottom: 8px; }
.clora-job-title b { font-size: 12pt; }
.clora-bar { height: 14px; border-radius: 7px; background: var(--background-color4); overflow: hidden; }
.clora-bar > div { height: 100%; width: 0; background: var(--accent-color); transition: width 0.4s; }
.clora-bar[data-state="done"] > div { background: #2e7d32; }
.clora-stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(95px, 1fr)); gap: 6px; margin: 8px 0; }
.clora-stats div { background: var(--background-color3); border-radius: 5px; padding: 4px 6px; }
.clora-stats span { display: block; font-size: 8pt; color: var(--small-label-color, #999); }
.clora-log { background: var(--background-color4); border-radius: 5px; padding: 6px 8px; height: 170px; overflow: auto; font-family: monospace; font-size: 8.5pt;
white-space: pre-wrap; word-break: break-all; margin: 0; color: var(--text-color); }
.clora-samples { margin: 0 0 8px 0; }
.clora-samples-head { font-size: 9pt; color: var(--small-label-color, #999); margin-bottom: 4px; }
.clora-sample-strip { display: flex; gap: 6px; align-items: flex-end; overflow-x: auto; padding-bottom: 4px; }
.clora-root .clora-sample { flex: 0 0 auto; display: flex; flex-direction: column; align-items: center; gap: 2px; padding: 0; margin: 0;
background: none; border: none; color: var(--small-label-color, #999); font-size: 8pt; cursor: pointer; }
.clora-root .clora-sample:hover { background: none; color: var(--text-color); }
.clora-sample-pic { position: relative; display: block; width: 64px; height: 64px; border-radius: 5px; overflow: hidden;
background: var(--background-color4); border: 2px solid var(--background-color3); }
.clora-sample.clora-latest .clora-sample-pic { width: 112px; height: 112px; border-color: var(--accent-color); }
.clora-sample-label { max-width: 68px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.clora-sample.clora-latest .clora-sample-label { max-width: 116px; color: var(--text-color); font-weight: bold; }
.clora-sample:hover .clora-sample-pic, .clora-sample:focus-visible .clora-sample-pic { border-color: var(--accent-color-hover, var(--accent-color)); }
.clora-sample img { display: none; width: 100%; height: 100%; object-fit: cover; }
.clora-sample[data-status="ok"] img { display: block; }
.clora-sample:not([data-status="ok"]) .clora-sample-pic::after { content: "…"; position: absolute; inset: 0; display: flex; align-items: center; justify-content: center; }
.clora-sample[data-status="error"] .clora-sample-pic::after { content: "!"; color: var(--status-red, red); font-weight: bold; }
.clora-viewer { position: fixed; inset: 0; z-index: 10000; display: flex; flex-direction: column; align-items: center; justify-content: center; gap: 8px;
background: rgba(0, 0, 0, 0.85); cursor: zoom-out; outline: none; }
.clora-viewer img { width: min(90vw, 80vh); height: auto; max-height: 80vh; object-fit: contain; border-radius: 7px; background: var(--background-color4);
box-shadow: 0 4px 8px 0 rgba(0, 0, 0, 0.15), 0 6px 20px 0 rgba(0, 0, 0, 0.15); }
.clora-viewer-caption { color: var(--text-color); font-size: 10pt; text-align: center; }
.clora-viewer-caption span { color: var(--small-label-color, #999); }
.clora-viewer-hint { display: block; font-size: 9pt; margin-top: 2px; }
.clora-actions { display: flex; gap: 8px; margin-top: 8px; flex-wrap: wrap; align-items: center; }
.clora-result { margin-top: 8px; padding: 8px; border-radius: 5px; background: var(--background-color3); }
.clora-result.clora-error { border-left: 3px solid var(--status-red, red); }
.clora-result.clora-ok { border-left: 3px solid #2e7d32; }
.clora-result code { word-break: break-all; }
.clora-empty { color: var(--small-label-color, #999); font-size: 10pt; }
.clora-jobs { width: 100%; border-collapse: collapse; font-size: 10pt; }
.clora-jobs th { text-align: left; font-weight: normal; color: var(--small-label-color, #999); font-size: 9pt; padding: 2px 4px; }
.clora-jobs td { padding: 4px; border-top: 1px solid var(--background-color3); vertical-align: middle; }
.clora-jobs tr.clora-row { cursor: pointer; }
.clora-jobs tr.clora-row:hover td { background: var(--background-color3); }
.clora-jobs tr.clora-selected td { background: var(--background-color1); }
.clora-jobs .clora-small { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-jobs button { padding: 1px 6px; }
`

function field(labelText, input, { help, errorKey, extra } = {}) {
    const id = input.id
    const err = el("div", { className: "clora-err", attrs: { "data-error-for": errorKey || id, role: "alert" } })
    if (errorKey) ui.fieldErrors[errorKey] = err
    const server = el("div", { className: "clora-err", attrs: { "data-server-error-for": errorKey || id } })
    ui.serverErrors[errorKey || id] = server
    return el(
        "div",
        { className: "clora-field" },
        el("label", { text: labelText, attrs: { for: id } }),
        input,
        help ? el("div", { className: "clora-help", text: help }) : null,
        extra || null,
        err,
        server
    )
}

function buildUI() {
    ui.fieldErrors = {}
    ui.serverErrors = {}
    ui.params = {}

    ui.conn = el("div", { className: "clora-conn", attrs: { "data-status": "offline", "data-clora": "conn" } }, el("span", { className: "clora-dot" }), el("span", { text: "Daemon: not connected" }))
    ui.banner = el("div", { className: "clora-banner", attrs: { role: "alert", hidden: true, "data-clora": "banner" } })

    // --- form
    ui.name = el("input", { attrs: { id: "clora-name", type: "text", maxlength: 64, autocomplete: "off", placeholder: "e.g. Captain Mira", spellcheck: "false" } })
    ui.trigger = el("input", { attrs: { id: "clora-trigger", type: "text", maxlength: 32, autocomplete: "off", placeholder: "e.g. ohwx", spellcheck: "false" } })
    ui.classWord = el("input", { attrs: { id: "clora-class", type: "text", maxlength: 40, autocomplete: "off", placeholder: "person", spellcheck: "false" } })
    ui.baseModel = el("select", { attrs: { id: "clora-base-model" } })
    ui.arch = el("div", { className: "clora-arch", attrs: { "data-clora": "arch" } })
    ui.preset = el("select", { attrs: { id: "clora-preset" } })
    ui.presetHelp = el("div", { className: "clora-help", attrs: { "data-clora": "preset-help" } })

    for (const [input, key, validate] of [
        [ui.name, "name", validateName],
        [ui.trigger, "trigger", validateTrigger],
        [ui.classWord, "class_token", validateClass],
    ]) {
        input.addEventListener("input", () => {
            input.dataset.touched = "1"
            ui.serverErrors[key].textContent = ""
            renderForm()
        })
        input.addEventListener("blur", () => {
            if (input.value) input.dataset.touched = "1"
            renderForm()
        })
        input._validate = validate
    }
    ui.baseModel.addEventListener("change", () => {
        state.baseModelTouched = true
        ui.serverErrors.base_model.textContent = ""
        renderForm()
    })
    ui.preset.addEventListener("change", () => {
        state.paramsDirty.clear()
        fillParamsFromPreset()
        renderForm()
    })

    const advGrid = el("div", { className: "clora-adv" })
    for (const f of PARAM_FIELDS) {
        const input = el("input", {
            attrs: { id: "clora-p-" + f.key, type: "number", step: f.step, min: f.min, max: f.max, title: f.title, "data-param": f.key, inputmode: f.type === "int" ? "numeric" : "decimal" },
        })
        input.addEventListener("input", () => {
            state.paramsDirty.add(f.key)
            input.classList.add("clora-dirty")
            ui.serverErrors.params.textContent = ""
            renderForm()
        })
        ui.params[f.key] = input
        advGrid.appendChild(el("div", {}, el("label", { text: f.label, attrs: { for: input.id } }), input))
    }
    const resetBtn = el(
        "button",
        { className: "tertiaryButton", attrs: { type: "button" }, on: { click: () => { state.paramsDirty.clear(); fillParamsFromPreset(); renderForm() } } },
        "Reset to preset"
    )
    ui.serverErrors.params = el("div", { className: "clora-err" })
    ui.paramsError = el("div", { className: "clora-err", attrs: { "data-clora": "params-error", role: "alert" } })
    ui.advanced = el(
        "details",
        { attrs: { "data-clora": "advanced" } },
        el("summary", { text: "Advanced" }),
        advGrid,
        ui.paramsError,
        el("div", { className: "clora-actions" }, resetBtn, el("span", { className: "clora-help", text: "Changed values are sent; the rest come from the preset. Repeats: empty = automatic (≈200 image views per epoch). Preview: 0 = off." })),
        ui.serverErrors.params
    )

    // --- images
    ui.fileInput = el("input", { attrs: { type: "file", accept: "image/*", multiple: true, hidden: true, "data-clora": "file-input" } })
    ui.fileInput.addEventListener("change", () => {
        addFiles(ui.fileInput.files)
        ui.fileInput.value = ""
    })
    ui.drop = el(
        "div",
        { className: "clora-drop", attrs: { tabindex: "0", role: "button", "data-clora": "dropzone" } },
        icon("fa-images"),
        el("div", { text: "Drop " + MIN_IMAGES + "–" + MAX_IMAGES + " pictures of the character here, or click to choose files" }),
        el("div", { className: "clora-help", text: "Different angles, clothes and backgrounds work best. PNG, JPEG or WebP, at least " + MIN_SIDE + " px a side." })
    )
    ui.drop.addEventListener("click", () => ui.fileInput.click())
    ui.drop.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
            e.preventDefault()
            ui.fileInput.click()
        }
    })
    for (const type of ["dragenter", "dragover"]) {
        ui.drop.addEventListener(type, (e) => {
            e.preventDefault()
            e.stopPropagation()
            if (e.dataTransfer) e.dataTransfer.dropEffect = "copy"
            ui.drop.classList.add("clora-over")
        })
    }
    ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("clora-over"))
    ui.drop.addEventListener("drop", (e) => {
        e.preventDefault()
        e.stopPropagation() // ED's own drop handlers (init image) must not see it
        ui.drop.classList.remove("clora-over")
        if (e.dataTransfer && e.dataTransfer.files) addFiles(e.dataTransfer.files)
    })
    ui.thumbs = el("div", { className: "clora-thumbs", attrs: { "data-clora": "thumbs" } })
    ui.count = el("b", { attrs: { "data-clora": "count" } })
    ui.clearImages = el("button", { className: "tertiaryButton", attrs: { type: "button" }, on: { click: () => { clearImages(); renderForm() } } }, "Remove all")
    ui.imageReason = el("div", { className: "clora-err", attrs: { "data-clora": "images-reason" } })
    ui.imageNote = el("div", { className: "clora-help" })
    ui.serverErrors.images = el("div", { className: "clora-err", attrs: { "data-server-error-for": "images" } })

    ui.start = el("button", { className: "primaryButton", attrs: { type: "button", "data-clora": "start", disabled: true } }, icon("fa-play"), " Start training")
    ui.start.addEventListener("click", submit)
    ui.startReason = el("span", { className: "clora-reason", attrs: { "data-clora": "start-reason" } })
    ui.startError = el("div", { className: "clora-err", attrs: { "data-clora": "start-error" } })

    const formBox = el(
        "div",
        { className: "panel-box", attrs: { "data-clora": "form" } },
        el("h4", {}, icon("fa-user-gear"), "New character LoRA"),
        field("Character name", ui.name, { errorKey: "name" }),
        field("Trigger word", ui.trigger, { errorKey: "trigger", help: "A rare word that will call up the character in prompts." }),
        field("Class word", ui.classWord, { errorKey: "class_token", help: "What the character is: person, woman, man, dog… (default: person)" }),
        field("Base model", ui.baseModel, { errorKey: "base_model", extra: ui.arch }),
        field("Preset", ui.preset, { errorKey: "preset", extra: ui.presetHelp }),
        ui.advanced,
        ui.fileInput,
        ui.drop,
        ui.thumbs,
        el("div", { className: "clora-count" }, el("span", {}, "Pictures: ", ui.count), ui.clearImages),
        ui.imageReason,
        ui.imageNote,
        ui.serverErrors.images,
        el("div", { className: "clora-start" }, ui.start, ui.startReason),
        ui.startError
    )

    // --- training panel
    ui.jobPanel = el("div", { className: "panel-box", attrs: { "data-clora": "job-panel" } })
    ui.jobList = el("div", { className: "panel-box", attrs: { "data-clora": "job-list" } })

    const retry = el("button", { className: "tertiaryButton", attrs: { type: "button" }, on: { click: () => connect() } }, icon("fa-rotate-right"), " Reconnect")
    ui.root = el(
        "div",
        { className: "clora-root", attrs: { "data-clora": "root" } },
        el("div", { className: "clora-header" }, el("h3", {}, "Train a character LoRA"), el("div", { style: { display: "flex", gap: "8px", alignItems: "center" } }, ui.conn, retry)),
        ui.banner,
        el("div", { className: "clora-columns" }, formBox, el("div", { style: { display: "flex", flexDirection: "column", gap: "12px" } }, ui.jobPanel, ui.jobList))
    )
    renderBaseModels()
    renderPresets()
    renderAll()
    return ui.root
}

// ------------------------------------------------------------------ rendering

let renderPending = false
function scheduleRender() {
    if (renderPending) return
    renderPending = true
    requestAnimationFrame(() => {
        renderPending = false
        renderAll()
    })
    // rAF does not run in background tabs; make sure the state still lands
    setTimeout(() => {
        if (renderPending) {
            renderPending = false
            renderAll()
        }
    }, 250)
}

function renderAll() {
    if (!ui.root) return
    renderConnection()
    renderBanner()
    renderForm()
    renderJobPanel()
    renderJobList()
}

function renderConnection() {
    if (!ui.conn) return
    const status = state.health !== "ok" ? "offline" : client.socket.connected ? "live" : "reconnecting"
    ui.conn.dataset.status = status
    ui.conn.lastChild.textContent =
        status === "live" ? "Daemon: connected" : status === "reconnecting" ? "Daemon: reconnecting…" : state.health === "checking" ? "Daemon: checking…" : "Daemon: not connected"
    if (ui.root) ui.root.dataset.ready = String(state.health === "ok" && !!(state.ready && state.ready.ready))
}

function renderBanner() {
    if (!ui.banner) return
    const problems = state.problems || []
    if (state.health === "checking" && !problems.length) {
        ui.banner.hidden = true
        return
    }
    if (!problems.length) {
        ui.banner.hidden = true
        ui.banner.replaceChildren()
        return
    }
    const waiting = problems.every((p) => p.waiting)
    ui.banner.hidden = false
    ui.banner.classList.toggle("clora-waiting", waiting)
    const title =
        state.health === "down"
            ? "The training daemon is not available"
            : state.ready && !state.ready.ready
              ? "The training daemon is not ready to train"
              : "Character LoRA needs attention"
    const list = el(
        "ul",
        {},
        problems.map((p) => el("li", { attrs: { "data-clora": "problem" } }, el("span", { text: p.title }), p.fix ? el("span", { className: "clora-fix", text: "Fix: " + p.fix }) : null))
    )
    const buttons = [el("button", { className: "tertiaryButton", attrs: { type: "button", "data-clora": "retry" }, on: { click: () => connect() } }, icon("fa-rotate-right"), " Retry")]
    if (problems.some((p) => p.canStart)) {
        ui.bannerStart = el("button", { className: "primaryButton", attrs: { type: "button", "data-clora": "start-daemon" }, on: { click: startDaemon } }, icon("fa-play"), " Start daemon")
        buttons.push(ui.bannerStart)
    }
    ui.banner.replaceChildren(el("h4", {}, icon(waiting ? "fa-hourglass-half" : "fa-triangle-exclamation"), " " + title), list, el("div", {}, buttons))
}

function renderPresets() {
    if (!ui.preset) return
    const names = Object.keys(state.presets)
    const current = ui.preset.value
    if (!names.length) {
        ui.preset.replaceChildren(el("option", { text: "(loading…)", attrs: { value: "" } }))
        return
    }
    if (ui.preset.options.length === names.length && names.every((n, i) => ui.preset.options[i].value === n)) return
    ui.preset.replaceChildren(...names.map((n) => el("option", { text: n + (n === state.defaultPreset ? " (recommended)" : ""), attrs: { value: n } })))
    ui.preset.value = names.includes(current) ? current : names.includes(state.defaultPreset) ? state.defaultPreset : names[0]
    fillParamsFromPreset()
}

function fillParamsFromPreset() {
    for (const f of PARAM_FIELDS) {
        const input = ui.params[f.key]
        if (state.paramsDirty.has(f.key)) continue
        input.classList.remove("clora-dirty")
        if (f.auto) {
            input.value = ""
            input.placeholder = "auto (" + autoRepeats(state.images.length || MIN_IMAGES) + ")"
        } else {
            input.value = paramDefault(f)
        }
    }
}

function edModelIds() {
    const db = ed.modelsDB()
    const sd = db && db["stable-diffusion"]
    if (sd && Object.keys(sd).length) return Object.keys(sd).sort((a, b) => a.localeCompare(b))
    if (state.daemonModels) return state.daemonModels.map((m) => m.id)
    return []
}

function edCurrentModel() {
    const f = ed.sdModelField()
    try {
        return f && f.value ? String(f.value) : ""
    } catch (e) {
        return ""
    }
}

function renderBaseModels() {
    if (!ui.baseModel) return
    const ids = edModelIds()
    const keep = state.baseModelTouched ? ui.baseModel.value : edCurrentModel() || ui.baseModel.value
    const same = ui.baseModel.options.length === ids.length && ids.every((id, i) => ui.baseModel.options[i].value === id)
    if (!same) {
        ui.baseModel.replaceChildren(
            ...(ids.length ? ids.map((id) => el("option", { text: id, attrs: { value: id } })) : [el("option", { text: "(no models found)", attrs: { value: "" } })])
        )
    }
    if (keep && ids.includes(keep)) ui.baseModel.value = keep
}

function renderForm() {
    if (!ui.name) return
    const errs = formErrors()
    for (const [input, key] of [
        [ui.name, "name"],
        [ui.trigger, "trigger"],
        [ui.classWord, "class_token"],
    ]) {
        const show = input.dataset.touched && errs[key]
        ui.fieldErrors[key].textContent = show ? errs[key] : ""
        input.setAttribute("aria-invalid", show ? "true" : "false")
    }
    // base model + architecture
    const id = selectedBaseModel()
    const arch = baseModelArch(id)
    let archText = ""
    let warn = false
    if (id) {
        if (arch === "unknown") {
            archText = "Architecture: unknown (not in Easy Diffusion's model info); the daemon checks it when training starts."
            warn = true
        } else if (arch && arch.startsWith("other:")) {
            archText = "Architecture: " + arch.slice(6) + " (Easy Diffusion's tag)."
            warn = true
        } else {
            archText = "Architecture: " + (ARCH_LABELS[arch] || arch) + (arch === "sdxl" ? " (SDXL)" : "")
            warn = !!archProblem(arch)
        }
        const cur = edCurrentModel()
        if (cur && cur === id) archText += " · Easy Diffusion's current model."
        if (state.daemonModels && !state.daemonModels.some((m) => m.id === id)) {
            archText += " The daemon does not see this model: check ed_models_dir in its config."
            warn = true
        }
    }
    ui.arch.textContent = archText
    ui.arch.dataset.arch = arch || ""
    ui.arch.classList.toggle("clora-warn", warn)
    ui.fieldErrors.base_model.textContent = errs.base_model || ""

    // preset summary
    const steps = estimateSteps()
    const p = presetValues()
    ui.presetHelp.textContent = p && p.epochs
        ? "≈ " + (steps || "?") + " steps · " + (state.paramsDirty.has("epochs") ? readParam({ key: "epochs" }) : p.epochs) + " epochs · rank " + (state.paramsDirty.has("network_dim") ? readParam({ key: "network_dim" }) : p.network_dim)
        : ""
    if (ui.params.repeats && !state.paramsDirty.has("repeats")) ui.params.repeats.placeholder = "auto (" + autoRepeats(state.images.length || MIN_IMAGES) + ")"
    const preview = PARAM_FIELDS.find((f) => f.key === "sample_every_n_epochs")
    if (ui.params[preview.key] && !state.paramsDirty.has(preview.key)) {
        const d = paramDefault(preview) // follows a changed epoch count, as the daemon does
        if (ui.params[preview.key].value !== d) ui.params[preview.key].value = d
    }
    // Advanced values, checked as typed (the Start reason repeats the first problem)
    const issue = paramsIssue()
    ui.paramsError.textContent = issue ? issue.text : ""
    for (const f of PARAM_FIELDS) ui.params[f.key].setAttribute("aria-invalid", issue && issue.key === f.key ? "true" : "false")

    // images
    const n = state.images.length
    const ok = n >= MIN_IMAGES && n <= MAX_IMAGES && !state.images.some((i) => i.problem)
    ui.count.textContent = n + " (" + MIN_IMAGES + "–" + MAX_IMAGES + ")"
    ui.count.dataset.ok = String(ok)
    ui.clearImages.hidden = n === 0
    const imgReason = imagesProblem()
    ui.imageReason.textContent = n > 0 && imgReason ? imgReason : ""

    const blocker = startBlocker()
    ui.start.disabled = !!blocker
    ui.startReason.textContent = blocker || "About " + (estimateSteps() || "?") + " steps."
}

function renderImages() {
    if (!ui.thumbs) return
    ui.thumbs.replaceChildren(
        ...state.images.map((img) =>
            el(
                "div",
                { className: "clora-thumb" + (img.problem ? " clora-bad" : ""), attrs: { title: img.file.name + (img.problem ? " — " + img.problem : ""), "data-clora": "thumb" } },
                el("img", { attrs: { src: img.url, alt: img.file.name, loading: "lazy" } }),
                el(
                    "button",
                    { className: "secondaryButton", attrs: { type: "button", title: "Remove " + img.file.name, "aria-label": "Remove " + img.file.name, "data-clora": "remove-image" }, on: { click: (e) => { e.stopPropagation(); removeImage(img.id) } } },
                    icon("fa-xmark")
                )
            )
        )
    )
}

function sortedJobs() {
    return Array.from(state.jobs.values()).sort((a, b) => (b.created_at || 0) - (a.created_at || 0))
}

function selectedJob() {
    if (state.userSelected && state.selectedId && state.jobs.has(state.selectedId)) return state.jobs.get(state.selectedId)
    const jobs = sortedJobs()
    const active = jobs.find((j) => ACTIVE.includes(j.state))
    if (active) return active
    if (state.selectedId && state.jobs.has(state.selectedId)) return state.jobs.get(state.selectedId)
    return jobs[0] || null
}

let renderedJobKey = null
function renderJobPanel() {
    if (!ui.jobPanel) return
    const job = selectedJob()
    const shownId = job ? job.id : null
    if (shownId !== samplesJobId) {
        // another job (or none) in the panel: let the previous job's pictures go
        samplesJobId = shownId
        closeViewer()
        pruneSamples(shownId)
    }
    if (!job) {
        renderedJobKey = null
        ui.jobPanel.replaceChildren(el("h4", {}, icon("fa-hourglass-half"), "Training"), el("div", { className: "clora-empty", text: "No training yet. Fill in the form and press Start training." }))
        return
    }
    // rebuild the panel when the job or its state changes; otherwise update in place (keeps log scroll)
    const key = job.id + "|" + job.state + "|" + (job.lora_id || "") + "|" + (finishing.has(job.id) ? 1 : 0)
    if (key !== renderedJobKey) {
        renderedJobKey = key
        buildJobPanel(job)
    }
    updateJobPanel(job)
}

function buildJobPanel(job) {
    const p = {}
    p.badge = el("span", { className: "clora-badge", attrs: { "data-state": job.state, "data-clora": "job-state" }, text: STATE_LABELS[job.state] || job.state })
    p.bar = el("div", { className: "clora-bar", attrs: { "data-state": job.state, role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "data-clora": "progress" } }, el("div"))
    const stat = (label, name) => {
        const v = el("b", { attrs: { "data-clora": "stat-" + name }, text: "–" })
        p[name] = v
        return el("div", {}, el("span", { text: label }), v)
    }
    p.stats = el("div", { className: "clora-stats" }, stat("Step", "step"), stat("Epoch", "epoch"), stat("Loss", "loss"), stat("Speed", "rate"), stat("Time left", "eta"))
    p.samples = el("div", { className: "clora-samples", attrs: { "data-clora": "samples", hidden: true } })
    p.sampleNodes = new Map() // sample url -> {btn, img}
    p.samplesKey = null
    p.log = el("pre", { className: "clora-log", attrs: { "data-clora": "log", "aria-live": "off" } })
    p.actions = el("div", { className: "clora-actions" })
    if (!isFinished(job)) {
        const cancel = el("button", { className: "secondaryButton", attrs: { type: "button", "data-clora": "cancel" } }, icon("fa-stop"), " Cancel")
        let armed = false
        let timer = null
        cancel.addEventListener("click", async () => {
            if (!armed) {
                armed = true
                cancel.lastChild.textContent = " Click again to cancel"
                timer = setTimeout(() => {
                    armed = false
                    cancel.lastChild.textContent = " Cancel"
                }, 4000)
                return
            }
            clearTimeout(timer)
            cancel.disabled = true
            cancel.lastChild.textContent = " Cancelling…"
            try {
                const j = await client.request("POST", "/jobs/" + encodeURIComponent(job.id) + "/cancel", null, { timeoutMs: 30000 })
                if (j && j.id) upsertJob(j)
            } catch (e) {
                toast("Could not cancel: " + e.message, true)
                cancel.disabled = false
                cancel.lastChild.textContent = " Cancel"
            }
            scheduleRender()
        })
        p.actions.appendChild(cancel)
    }
    let result = null
    if (job.state === "done") {
        const use = el("button", { className: "primaryButton", attrs: { type: "button", "data-clora": "use-it" }, on: { click: () => useLora(job) } }, icon("fa-wand-magic-sparkles"), " Use it")
        use.disabled = !job.lora_id || finishing.has(job.id)
        result = el(
            "div",
            { className: "clora-result clora-ok", attrs: { "data-clora": "result" } },
            el("div", {}, icon("fa-circle-check"), " Saved as LoRA ", el("code", { text: job.lora_id || "?" })),
            el("div", { className: "clora-small", text: "Prompt with “" + job.trigger + "”; a weight around " + DEFAULT_LORA_WEIGHT + " is a good start." }),
            el("div", { className: "clora-actions" }, use)
        )
    } else if (job.state === "error" || job.state === "interrupted" || job.state === "cancelled") {
        const err = job.error || {}
        result = el(
            "div",
            { className: "clora-result clora-error", attrs: { "data-clora": "result" } },
            el("div", { text: err.message || (job.state === "cancelled" ? "Training was cancelled." : job.state === "interrupted" ? "Training was interrupted (the daemon stopped)." : "Training failed.") }),
            err.hint ? el("div", { className: "clora-fix clora-small", text: "Fix: " + err.hint }) : null
        )
    }
    ui.jobParts = p
    ui.jobPanel.replaceChildren(
        el("h4", {}, icon("fa-chart-line"), "Training"),
        el("div", { className: "clora-job-title" }, el("div", {}, el("b", { text: job.name }), " ", el("span", { className: "clora-small", text: "trigger “" + job.trigger + "”, " + (job.image_count || "?") + " pictures" })), p.badge),
        p.bar,
        p.stats,
        p.samples,
        p.log,
        ...(result ? [result] : []),
        p.actions
    )
}

function updateJobPanel(job) {
    const p = ui.jobParts
    if (!p) return
    const pr = job.progress || {}
    const total = pr.total || 0
    const step = pr.step || 0
    let pct = total ? Math.min(100, (100 * step) / total) : 0
    if (job.state === "done") pct = 100
    p.bar.firstChild.style.width = pct.toFixed(1) + "%"
    p.bar.setAttribute("aria-valuenow", pct.toFixed(0))
    p.step.textContent = total ? step + " / " + total : step ? String(step) : "–"
    p.epoch.textContent = pr.epochs ? (pr.epoch || 0) + " / " + pr.epochs : pr.epoch ? String(pr.epoch) : "–"
    p.loss.textContent = typeof pr.loss === "number" ? pr.loss.toFixed(4) : "–"
    p.rate.textContent = fmtRate(pr.rate)
    p.eta.textContent = isFinished(job) ? "–" : fmtDuration(pr.eta_s)
    updateSamples(job, p)
    const lines = job.logs || []
    const text = lines.join("\n")
    if (p.log.textContent !== text) {
        const atBottom = p.log.scrollHeight - p.log.scrollTop - p.log.clientHeight < 24
        p.log.textContent = text
        if (atBottom) p.log.scrollTop = p.log.scrollHeight
    }
}

// ------------------------------------------------------------------ preview pictures

// The daemon serves previews only with the token, so each is fetched as a blob and shown through an
// object URL. Cached by URL for the job in the panel (a redraw reuses it); revoked when it leaves.
const sampleCache = new Map() // daemon url + sample url -> {jobId, url, status, objectUrl, error, dead}
let samplesJobId = null

function sampleLabel(file) {
    const m = SAMPLE_NAME_RE.exec(file || "")
    if (!m) return file || "?"
    const idx = parseInt(m[2], 10)
    return "epoch " + parseInt(m[1], 10) + (idx > 0 ? " #" + (idx + 1) : "")
}

function sampleKey(url) {
    return (client.url || "") + url
}

/** The cache entry for a preview, fetching it the first time (or again after a failure, on `retry`). */
function loadSample(jobId, url, { retry = false } = {}) {
    const key = sampleKey(url)
    const have = sampleCache.get(key)
    if (have && !(retry && have.status === "error")) return have
    const entry = { jobId, url, status: "loading", objectUrl: null, error: null, dead: false }
    sampleCache.set(key, entry)
    client
        .blob(url)
        .then((blob) => {
            if (entry.dead) return
            entry.objectUrl = URL.createObjectURL(blob)
            entry.status = "ok"
        })
        .catch((e) => {
            if (entry.dead) return
            entry.status = "error"
            entry.error = e.message
        })
        .finally(() => {
            if (entry.dead) return
            const node = ui.jobParts && ui.jobParts.sampleNodes && ui.jobParts.sampleNodes.get(url)
            if (node) paintSample(node, entry)
        })
    return entry
}

/** Forget (and revoke) every cached preview that is not the given job's. */
function pruneSamples(keepJobId) {
    for (const [key, entry] of Array.from(sampleCache.entries())) {
        if (entry.jobId === keepJobId) continue
        entry.dead = true
        if (entry.objectUrl) URL.revokeObjectURL(entry.objectUrl)
        sampleCache.delete(key)
    }
}

function paintSample(node, entry) {
    node.btn.dataset.status = entry.status
    if (entry.status === "ok" && node.img.getAttribute("src") !== entry.objectUrl) node.img.src = entry.objectUrl
    if (entry.status === "error") node.btn.title = node.label + ": could not load it (" + entry.error + "). Click to try again."
    else node.btn.title = node.label + " (" + node.file + "), click to enlarge"
}

function makeSampleNode(job, sample) {
    const label = sampleLabel(sample.file)
    const img = el("img", { attrs: { alt: "Preview, " + label, draggable: "false", "data-clora": "sample-img" } })
    const btn = el(
        "button",
        { className: "clora-sample", attrs: { type: "button", "data-clora": "sample", "data-file": sample.file } },
        el("span", { className: "clora-sample-pic" }, img),
        el("span", { className: "clora-sample-label", text: label })
    )
    const node = { btn, img, label, file: sample.file }
    btn.addEventListener("click", () => {
        const entry = loadSample(job.id, sample.url)
        if (entry.status === "ok") openViewer(node, entry)
        else if (entry.status === "error") paintSample(node, loadSample(job.id, sample.url, { retry: true }))
    })
    paintSample(node, loadSample(job.id, sample.url))
    return node
}

/** The job's previews, oldest first, the newest larger; a note while none came yet. */
function updateSamples(job, p) {
    if (!p.samples) return
    const samples = Array.isArray(job.samples) ? job.samples.filter((s) => s && s.url) : []
    const every = (job.params && Number(job.params.sample_every_n_epochs)) || 0
    const key = samples.map((s) => s.url).join("\n") + "|" + every + "|" + isFinished(job)
    if (key === p.samplesKey) return
    p.samplesKey = key
    if (!samples.length) {
        p.sampleNodes.clear()
        const waiting = every > 0 && !isFinished(job)
        p.samples.hidden = !waiting
        p.samples.replaceChildren(
            ...(waiting
                ? [el("div", { className: "clora-empty", attrs: { "data-clora": "samples-note" }, text: every === 1 ? "Preview pictures appear every epoch." : "Preview pictures appear every " + every + " epochs." })]
                : [])
        )
        return
    }
    let strip = p.samples.querySelector(".clora-sample-strip")
    const head = el(
        "div",
        { className: "clora-samples-head" },
        icon("fa-images"),
        " Preview pictures (" + samples.length + ")" + (every > 0 && !isFinished(job) ? " · every " + (every === 1 ? "epoch" : every + " epochs") : "") + " · click one to enlarge"
    )
    const atEnd = !strip || strip.scrollWidth - strip.scrollLeft - strip.clientWidth < 24
    if (!strip) strip = el("div", { className: "clora-sample-strip", attrs: { "data-clora": "sample-strip" } })
    const nodes = samples.map((s, i) => {
        let node = p.sampleNodes.get(s.url)
        if (!node) {
            node = makeSampleNode(job, s)
            p.sampleNodes.set(s.url, node)
        }
        node.btn.classList.toggle("clora-latest", i === samples.length - 1)
        return node.btn
    })
    strip.replaceChildren(...nodes)
    p.samples.hidden = false
    p.samples.replaceChildren(head, strip)
    if (atEnd) strip.scrollLeft = strip.scrollWidth // keep the newest in view
}

function openViewer(node, entry) {
    closeViewer()
    const viewer = el(
        "div",
        { className: "clora-viewer", attrs: { role: "dialog", "aria-modal": "true", "aria-label": "Preview picture, " + node.label, tabindex: "-1", "data-clora": "viewer" } },
        el("img", { attrs: { src: entry.objectUrl, alt: "Preview, " + node.label, "data-clora": "viewer-img" } }),
        el("div", { className: "clora-viewer-caption" }, el("b", { text: node.label }), " ", el("span", { text: node.file }), el("span", { className: "clora-viewer-hint", text: "Click or press Esc to close" }))
    )
    viewer.addEventListener("click", () => closeViewer())
    ui.viewer = viewer
    ui.viewerOpener = node.btn
    ui.root.appendChild(viewer)
    document.addEventListener("keydown", onViewerKey, true)
    viewer.focus()
}

function onViewerKey(e) {
    if (e.key !== "Escape") return
    e.preventDefault()
    e.stopPropagation() // ED's own Esc handlers must not act on it
    closeViewer()
}

function closeViewer() {
    if (!ui.viewer) return
    document.removeEventListener("keydown", onViewerKey, true)
    ui.viewer.remove()
    ui.viewer = null
    const opener = ui.viewerOpener
    ui.viewerOpener = null
    if (opener && opener.isConnected) opener.focus()
}

function renderJobList() {
    if (!ui.jobList) return
    const jobs = sortedJobs().slice(0, 30)
    const current = selectedJob()
    const head = el("h4", {}, icon("fa-list"), "Recent jobs")
    if (!jobs.length) {
        ui.jobList.replaceChildren(head, el("div", { className: "clora-empty", text: "No jobs yet." }))
        return
    }
    const rows = jobs.map((job) => {
        let result = ""
        if (job.state === "done") result = job.lora_id || ""
        else if (job.error && job.error.message) result = job.error.message
        else if (!isFinished(job) && job.progress && job.progress.total) result = Math.floor((100 * (job.progress.step || 0)) / job.progress.total) + "%"
        const del = isFinished(job)
            ? el(
                  "button",
                  {
                      className: "tertiaryButton",
                      attrs: { type: "button", title: "Remove from the list (the LoRA file stays)", "aria-label": "Remove job " + job.name },
                      on: {
                          click: async (e) => {
                              e.stopPropagation()
                              try {
                                  await client.request("DELETE", "/jobs/" + encodeURIComponent(job.id))
                                  state.jobs.delete(job.id)
                                  scheduleRender()
                              } catch (err) {
                                  toast("Could not remove the job: " + err.message, true)
                              }
                          },
                      },
                  },
                  icon("fa-trash-can")
              )
            : null
        const useBtn =
            job.state === "done" && job.lora_id
                ? el("button", { className: "tertiaryButton", attrs: { type: "button", title: "Use it" }, on: { click: (e) => { e.stopPropagation(); useLora(job) } } }, icon("fa-wand-magic-sparkles"))
                : null
        const tr = el(
            "tr",
            { className: "clora-row" + (current && current.id === job.id ? " clora-selected" : ""), attrs: { "data-job-id": job.id, "data-clora": "job-row" } },
            el("td", {}, el("div", { text: job.name }), el("div", { className: "clora-small", text: job.trigger })),
            el("td", {}, el("span", { className: "clora-badge", attrs: { "data-state": job.state }, text: STATE_LABELS[job.state] || job.state })),
            el("td", { className: "clora-small", text: result, attrs: { title: result } }),
            el("td", { className: "clora-small", text: fmtTime(job.created_at) }),
            el("td", { style: { whiteSpace: "nowrap", textAlign: "right" } }, useBtn, " ", del)
        )
        tr.addEventListener("click", () => {
            state.selectedId = job.id
            state.userSelected = true
            renderAll()
        })
        return tr
    })
    ui.jobList.replaceChildren(
        head,
        el("table", { className: "clora-jobs" }, el("thead", {}, el("tr", {}, el("th", { text: "Character" }), el("th", { text: "State" }), el("th", { text: "Result" }), el("th", { text: "Started" }), el("th"))), el("tbody", {}, rows))
    )
}

// ------------------------------------------------------------------ start-up

function install() {
    const makeTab = ed.createTab()
    if (!makeTab || !document.getElementById("tab-container") || !document.getElementById("tab-content-wrapper")) return false
    if (document.getElementById("tab-" + TAB_ID)) return true
    const root = buildUI()
    makeTab({
        id: TAB_ID,
        icon: "fa-user-gear",
        label: "Train character LoRA",
        css: CSS,
        content: root,
        onOpen: () => {
            // follow ED's current model until the user picks one here
            renderBaseModels()
            renderAll()
            if (state.health === "down") connect()
            return undefined
        },
    })
    document.addEventListener("refreshModels", () => {
        renderBaseModels()
        renderForm()
    })
    const sd = ed.sdModelField()
    if (sd && typeof sd.addEventListener === "function") {
        sd.addEventListener("change", () => {
            if (!state.baseModelTouched) {
                renderBaseModels()
                renderForm()
            }
        })
    }
    connect()
    return true
}

const api = {
    loaded: true,
    version: VERSION,
    state,
    reconnect: () => connect(),
    /** for tests and other plugins: the job the panel shows */
    selectedJob: () => selectedJob(),
}
window.CharacterLoRA = Object.assign(window.CharacterLoRA || {}, api)

// ED runs plugins after its own scripts, but plugin managers may eval us earlier: wait for createTab.
if (!install()) {
    let tries = 0
    const timer = setInterval(() => {
        tries += 1
        if (install() || tries > 600) clearInterval(timer)
    }, 100)
}
