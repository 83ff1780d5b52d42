// The form view: presets, base models (following ED's model), fields, advanced parameters, pictures, Start.
import { MIN_IMAGES, MAX_IMAGES, ARCH_LABELS, PARAM_FIELDS } from "../constants.js"
import { ed } from "../ed.js"
import { el } from "../dom.js"
import { state } from "../store.js"
import { ui } from "./ui.js"
import { imagesProblem, selectedBaseModel, baseModelArch, formErrors, startBlocker, baseValues, readParam, paramsIssue, paramDefault, defaultRepeats, estimateSteps, archLabel, isTrainable, daemonModel } from "../form-rules.js"
import { ensureFit, ensurePresets, shownFit } from "../fit.js"

export function renderPresets() {
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
export function fillParamsFromPreset() {
    for (const f of PARAM_FIELDS) {
        const input = ui.params[f.key]
        if (state.paramsDirty.has(f.key)) continue
        input.classList.remove("clora-dirty")
        if (f.auto) {
            input.value = ""
            input.placeholder = "auto (" + defaultRepeats(state.images.length || MIN_IMAGES) + ")"
        } else {
            input.value = paramDefault(f)
        }
    }
}
export function edModelIds() {
    const db = ed.modelsDB()
    const sd = db && db["stable-diffusion"]
    if (sd && Object.keys(sd).length) return Object.keys(sd).sort((a, b) => a.localeCompare(b))
    if (state.daemonModels) return state.daemonModels.map((m) => m.id)
    return []
}
export function edCurrentModel() {
    const f = ed.sdModelField()
    try {
        return f && f.value ? String(f.value) : ""
    } catch (e) {
        return ""
    }
}
/** A model's line in the picker: its id, its family, and whether the daemon can train it. */
export function modelOption(id) {
    const arch = baseModelArch(id)
    const known = arch && arch !== "unknown"
    const trainable = isTrainable(id)
    const text = id + " — " + (known ? archLabel(arch) : "architecture unknown") + (trainable ? "" : " (cannot be trained)")
    return { id, text, arch: arch || "unknown", trainable }
}
export function renderBaseModels() {
    if (!ui.baseModel) return
    const ids = edModelIds()
    const keep = state.baseModelTouched ? ui.baseModel.value : edCurrentModel() || ui.baseModel.value
    const opts = ids.map(modelOption)
    const same = ui.baseModel.options.length === ids.length && opts.every((o, i) => ui.baseModel.options[i].value === o.id && ui.baseModel.options[i].textContent === o.text)
    if (!same) {
        ui.baseModel.replaceChildren(
            ...(opts.length
                ? opts.map((o) => el("option", { text: o.text, attrs: { value: o.id, "data-arch": o.arch, "data-trainable": String(o.trainable) } }))
                : [el("option", { text: "(no models found)", attrs: { value: "" } })])
        )
    }
    if (keep && ids.includes(keep)) ui.baseModel.value = keep
}
/** Advanced's "Memory tier": Automatic (what the daemon picks for this card) and the daemon's tiers. */
export function renderTiers() {
    if (!ui.memoryTier) return
    ui.memoryTierField.hidden = state.fitUnsupported
    const auto = state.autoTier || ""
    const opts = [{ id: "auto", label: auto ? "Automatic (" + auto + ")" : "Automatic" }].concat(state.tiers.map((t) => ({ id: t.id, label: t.label || t.id })))
    // the daemon refuses a GPU tier without a CUDA GPU, and the CPU tier with one
    const gpu = state.fitGpu
    for (const o of opts) {
        if (!gpu || o.id === "auto") o.why = ""
        else if (gpu.cuda && o.id === "cpu") o.why = "for machines without a CUDA GPU"
        else if (!gpu.cuda && o.id !== "cpu") o.why = "needs a CUDA GPU; this machine has none"
        else o.why = ""
    }
    const same = ui.memoryTier.options.length === opts.length && opts.every((o, i) => {
        const node = ui.memoryTier.options[i]
        return node.value === o.id && node.textContent === o.label && node.disabled === !!o.why
    })
    if (!same) ui.memoryTier.replaceChildren(...opts.map((o) => el("option", { text: o.label, attrs: { value: o.id, disabled: !!o.why, title: o.why || undefined } })))
    if (!opts.some((o) => o.id === state.memoryTier)) state.memoryTier = "auto"
    ui.memoryTier.value = state.memoryTier
    ui.memoryTier.classList.toggle("clora-dirty", state.memoryTier !== "auto")
}
/** The line under the preset: the tier the daemon picked (or was told) and why, from /fit. */
export function renderFitLine() {
    if (!ui.fit) return
    const fit = shownFit()
    const data = fit && fit.data
    let text = ""
    let warn = false
    if (fit && fit.error) {
        text = fit.error
        warn = true
    } else if (data && data.trainable !== false && data.reason) {
        text = data.reason // for a tier chosen in Advanced the daemon says "… settings chosen by hand"
    } else if (!data && selectedBaseModel()) {
        text = "Checking how training fits this computer…"
    }
    // the line keeps its room (two lines, see css.js) while it is asked for and replaced, so that nothing
    // below it moves under the user's pointer; only a daemon without /fit has no line at all
    ui.fit.textContent = text
    ui.fit.hidden = state.fitUnsupported
    ui.fit.dataset.tier = (data && data.trainable !== false && data.tier) || ""
    ui.fit.dataset.auto = data ? String(data.auto !== false) : ""
    ui.fit.classList.toggle("clora-warn", warn)
}
export function renderForm() {
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
    ensurePresets(arch)
    let archText = ""
    let warn = false
    if (id) {
        if (arch === "unknown") {
            // the daemon's own words when it could not read the family either (it then trains it as SD 1.x)
            const note = daemonModel(id) && daemonModel(id).note
            archText = note ? "Architecture: unknown. " + note : "Architecture: unknown (not in Easy Diffusion's model info); the daemon checks it when training starts."
            warn = true
        } else if (arch && arch.startsWith("other:")) {
            archText = "Architecture: " + arch.slice(6) + " (Easy Diffusion's tag)."
            warn = true
        } else {
            archText = "Architecture: " + (ARCH_LABELS[arch] || arch) + "."
            warn = !!errs.base_model
        }
        const cur = edCurrentModel()
        if (cur && cur === id) archText += " · Easy Diffusion's current model."
        if (state.daemonModels && !daemonModel(id)) {
            archText += " The daemon does not see this model: check ed_models_dir in its config."
            warn = true
        }
    }
    ui.arch.textContent = archText
    ui.arch.dataset.arch = arch || ""
    ui.arch.classList.toggle("clora-warn", warn)
    ui.fieldErrors.base_model.textContent = errs.base_model || ""

    // the memory tier: asked again when the model, preset, tier or picture count changed
    ensureFit()
    renderTiers()
    renderFitLine()

    // preset summary
    const steps = estimateSteps()
    const p = baseValues()
    ui.presetHelp.textContent = p && p.epochs
        ? "≈ " + (steps || "?") + " steps · " + (state.paramsDirty.has("epochs") ? readParam({ key: "epochs" }) : p.epochs) + " epochs · rank " + (state.paramsDirty.has("network_dim") ? readParam({ key: "network_dim" }) : p.network_dim)
        : ""
    if (ui.params.repeats && !state.paramsDirty.has("repeats")) ui.params.repeats.placeholder = "auto (" + defaultRepeats(state.images.length || MIN_IMAGES) + ")"
    // unchanged fields show what the daemon will use: the preview interval follows a changed epoch count,
    // alpha a changed rank, as resolve_params does
    for (const f of PARAM_FIELDS) {
        if (f.auto || !ui.params[f.key] || state.paramsDirty.has(f.key)) continue
        const d = paramDefault(f)
        if (ui.params[f.key].value !== d) ui.params[f.key].value = d
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
