// Builds the tab's DOM once: the form, the job panel, the job list, the banner.
import { MIN_IMAGES, MAX_IMAGES, MIN_SIDE, PARAM_FIELDS } from "../constants.js"
import { el, icon } from "../dom.js"
import { state, renderAll, touchBaseModel, markParamChanged, resetParams } from "../store.js"
import { ui } from "./ui.js"
import { connect } from "../connection.js"
import { validateName, validateTrigger, validateClass } from "../form-rules.js"
import { submit } from "../submit.js"
import { addFiles, clearImages } from "../images.js"
import { renderPresets, fillParamsFromPreset, renderBaseModels, renderForm } from "./form.js"
import { lifecycleButtons } from "./banner.js"
import { taggerBox } from "./tagger.js"
import { faceCropField } from "../face-crop.js"

export function field(labelText, input, { help, errorKey, extra } = {}) {
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
export function buildUI() {
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
    // the daemon's memory tier for this card and why (GET /fit); hidden when the daemon has no /fit
    ui.fit = el("div", { className: "clora-fit", attrs: { "data-clora": "fit", hidden: true, "aria-live": "polite" } })

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
        touchBaseModel()
        ui.serverErrors.base_model.textContent = ""
        renderForm()
    })
    ui.preset.addEventListener("change", () => {
        resetParams()
        fillParamsFromPreset()
        renderForm()
    })

    const advGrid = el("div", { className: "clora-adv" })
    ui.memoryTier = el("select", {
        attrs: { id: "clora-memory-tier", "data-clora": "memory-tier", title: "How the run fits the graphics card: Automatic picks the fastest settings that fit its memory" },
    })
    ui.memoryTier.addEventListener("change", () => {
        state.memoryTier = ui.memoryTier.value || "auto"
        ui.serverErrors.params.textContent = ""
        renderForm()
    })
    ui.memoryTierField = el("div", { className: "clora-adv-tier" }, el("label", { text: "Memory tier", attrs: { for: ui.memoryTier.id } }), ui.memoryTier)
    advGrid.appendChild(ui.memoryTierField)
    for (const f of PARAM_FIELDS) {
        const input = el("input", {
            attrs: { id: "clora-p-" + f.key, type: "number", step: f.step, min: f.min, max: f.max, title: f.title, "data-param": f.key, inputmode: f.type === "int" ? "numeric" : "decimal" },
        })
        input.addEventListener("input", () => {
            markParamChanged(f.key)
            input.classList.add("clora-dirty")
            ui.serverErrors.params.textContent = ""
            renderForm()
        })
        ui.params[f.key] = input
        advGrid.appendChild(el("div", {}, el("label", { text: f.label, attrs: { for: input.id } }), input))
    }
    const resetBtn = el(
        "button",
        { className: "tertiaryButton", attrs: { type: "button" }, on: { click: () => { resetParams(); state.memoryTier = "auto"; fillParamsFromPreset(); renderForm() } } },
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
        el("div", { className: "clora-actions" }, resetBtn, el("span", { className: "clora-help", text: "Changed values are sent; the rest come from the preset and the memory tier. Repeats: empty = automatic (≈200 image views per epoch for SD 1.x, ≈100 for SDXL). Preview: 0 = off." })),
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
        field("Preset", ui.preset, { errorKey: "preset", extra: [ui.presetHelp, ui.fit] }),
        ui.advanced,
        ui.fileInput,
        ui.drop,
        ui.thumbs,
        faceCropField(),
        taggerBox(),
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
        el("div", { className: "clora-header" }, el("h3", {}, "Train a character LoRA"), el("div", { style: { display: "flex", gap: "8px", alignItems: "center", flexWrap: "wrap" } }, ui.conn, retry, ...lifecycleButtons())),
        ui.banner,
        el("div", { className: "clora-columns" }, formBox, el("div", { style: { display: "flex", flexDirection: "column", gap: "12px" } }, ui.jobPanel, ui.jobList))
    )
    renderBaseModels()
    renderPresets()
    renderAll()
    return ui.root
}
