// The form's rules, as the daemon checks them: names, trigger and class word, pictures, base model, advanced
// parameters, and the step estimate per kohya bucket.
import { MIN_IMAGES, MAX_IMAGES, BUCKET_STEP, CONTROL_RE, NAME_RE, TRIGGER_RE, ARCH_LABELS, PARAM_FIELDS } from "./constants.js"
import { ed } from "./ed.js"
import { archFromTags } from "./format.js"
import { state } from "./store.js"
import { ui } from "./views/ui.js"
import { currentFit, shownFit, fitKey } from "./fit.js"

export function validateName(v) {
    v = v.trim()
    if (!v) return "Give the character a name."
    if (!NAME_RE.test(v)) return "Use 1–64 letters, digits, spaces, - or _."
    return null
}
export function validateTrigger(v) {
    v = v.trim()
    if (!v) return "Give a trigger word, e.g. ohwx (a word the model does not know yet)."
    if (/\s/.test(v)) return "The trigger word cannot contain spaces."
    if (v.includes(",")) return "The trigger word cannot contain commas."
    if (CONTROL_RE.test(v)) return "The trigger word cannot contain control or invisible characters."
    if (v.startsWith("-")) return "The trigger word cannot start with '-'."
    if (!TRIGGER_RE.test(v)) return "Use at most 32 characters."
    return null
}
export function validateClass(v) {
    v = v.replace(/\s+/g, " ").trim()
    if (!v) return null
    if (v.includes(",")) return "The class word cannot contain commas."
    if (CONTROL_RE.test(v)) return "The class word cannot contain control or invisible characters."
    if (v.startsWith("-") || v.includes("--")) return "The class word cannot start with '-' or contain '--'."
    if (v.length > 40) return "Use at most 40 characters."
    return null
}
export function imagesProblem() {
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
export function selectedBaseModel() {
    return ui.baseModel ? ui.baseModel.value : ""
}
export function baseModelArch(id) {
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
export const archLabel = (arch) => ARCH_LABELS[arch] || String(arch).replace(/^other:/, "")
export function archProblem(arch) {
    if (!arch || arch === "unknown") return null
    if (state.supportedArchs.includes(arch)) return null
    return archLabel(arch) + " models cannot be trained yet; pick an " + state.supportedArchs.map(archLabel).join(" or ") + " model."
}
/** The daemon's entry ({id, file, arch, trainable}) of a model in ED's folder, or null. */
export function daemonModel(id) {
    return (state.daemonModels && state.daemonModels.find((m) => m.id === id)) || null
}
/** False when the daemon says it cannot train the model (SD 2.x, unknown), else true. */
export function isTrainable(id) {
    const m = daemonModel(id)
    if (m && m.trainable === false) return false
    return !archProblem(baseModelArch(id))
}
/** Why the chosen model cannot be trained, in the daemon's words (/fit's `why`) once it said so. */
export function baseModelProblem() {
    const id = selectedBaseModel()
    if (!id) return null
    const fit = shownFit()
    if (fit && fit.data && fit.data.trainable === false) return fit.data.why || archLabel(fit.data.arch || "unknown") + " models cannot be trained."
    const problem = archProblem(baseModelArch(id))
    if (problem) return problem
    const m = daemonModel(id)
    if (m && m.trainable === false) return m.why || archLabel(m.arch || "unknown") + " models cannot be trained; pick an " + state.supportedArchs.map(archLabel).join(" or ") + " model."
    return null
}
/** The daemon's refusal of the form's /fit question (e.g. a GPU memory tier on a machine without a GPU). */
export function fitProblem() {
    const fit = shownFit()
    return fit && fit.error && fit.key === fitKey() ? fit.error : null
}
export function formErrors() {
    return {
        name: validateName(ui.name.value),
        trigger: validateTrigger(ui.trigger.value),
        class_token: validateClass(ui.classWord.value),
        base_model: baseModelProblem(),
    }
}
export function startBlocker() {
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
    const fit = fitProblem()
    if (fit) return fit
    const p = paramsProblem()
    if (p) return p
    return null
}
/** The chosen preset's values for the chosen model's family (GET /presets?arch=; SD 1.x's until they came). */
export function presetValues() {
    const name = ui.preset && ui.preset.value
    const family = state.presetsByArch[baseModelArch(selectedBaseModel())]
    const presets = family && typeof family === "object" ? family : state.presets
    return presets[name] || state.presets[name] || {}
}
/** What the daemon trains with for the fields left unchanged: the preset, with /fit's params (the memory
 * tier's batch size, the family's resolution, repeats and learning rates as the batch size scales them) once
 * /fit answered for the form as it is. The preview interval stays the preset's: paramDefault applies the
 * daemon's CPU rule to it. */
export function baseValues() {
    const preset = presetValues()
    const fit = currentFit()
    if (!fit || !fit.params || typeof fit.params !== "object") return preset
    return Object.assign({}, preset, fit.params, { sample_every_n_epochs: preset.sample_every_n_epochs })
}
/** Repeats when the field is empty: /fit's for this many pictures, else the daemon's rule (≈200 views). */
export function defaultRepeats(n) {
    const fit = currentFit()
    const r = fit && fit.params && fit.params.repeats
    if (Number.isInteger(r) && r >= 1) return r
    // an older daemon aimed at 200 views for every family
    return autoRepeats(n, state.fitUnsupported ? "sd1" : baseModelArch(selectedBaseModel()))
}
export function readParam(f) {
    const input = ui.params[f.key]
    const raw = input.value.trim()
    if (raw === "") return undefined
    const num = Number(raw)
    return num
}
export function paramsProblem() {
    const issue = paramsIssue()
    return issue ? issue.text : null
}
/** The first changed Advanced value the daemon would refuse: {key, text}, or null. */
export function paramsIssue() {
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
    return relationsIssue()
}
// The daemon's learning-rate ceilings (daemon/pipeline/params.py MAX_LR, MAX_ADAPTIVE_LR)
const MAX_LR = 1e-2
const MAX_ADAPTIVE_LR = 2.0
const ADAPTIVE_OPTIMIZERS = ["Prodigy"]
/** A changed Advanced value that is there and a number, else undefined. */
function changedNumber(key) {
    if (!state.paramsDirty.has(key)) return undefined
    const v = readParam({ key })
    return v !== undefined && isFinite(v) ? v : undefined
}
// sd-scripts' LoRA learning-rate range tops out at 1e-3; the daemon's square-root rule never scales past it
// (daemon/pipeline/params.py SQRT_SCALED_OPTIMIZERS, MAX_SCALED_LR, scaled_lr)
const SQRT_SCALED_OPTIMIZERS = ["AdamW", "AdamW8bit", "Adafactor"]
const MAX_SCALED_LR = 1e-3
/** The preset's learning rate (tuned for its reference batch) carried over to `batch` as the daemon does:
 * lr × √(batch / reference), 3 significant digits. */
export function scaledLr(lr, batch, reference, optimizer) {
    if (!SQRT_SCALED_OPTIMIZERS.includes(optimizer) || !batch || !reference || batch === reference || !lr) return lr
    const scaled = Number((lr * Math.sqrt(batch / reference)).toPrecision(3))
    return Math.min(scaled, Math.max(lr, MAX_SCALED_LR))
}
/** The batch size the daemon trains with: a valid changed value; else the tier's, smaller for a changed
 * resolution above the one the tier is sized for (activations grow with the pixels: fit._apply_fit). */
export function effectiveBatch() {
    const typed = changedNumber("batch_size")
    if (typed !== undefined && Number.isInteger(typed) && typed >= 1) return typed
    const base = baseValues()
    const fit = currentFit()
    const res = changedNumber("resolution")
    const fitted = fit && fit.params
    if (fitted && Number.isInteger(res) && res > fitted.resolution && fitted.batch_size) {
        return Math.max(1, Math.floor(fitted.batch_size * Math.min(1, (fitted.resolution / res) ** 2)))
    }
    return base.batch_size
}
/** The rank the daemon trains with: a valid changed value, else the preset's. */
export function effectiveDim() {
    const v = changedNumber("network_dim")
    return v !== undefined && Number.isInteger(v) && v >= 1 && v <= 256 ? v : baseValues().network_dim
}
/** The alpha the daemon trains with. A changed rank without a changed alpha keeps the preset's alpha/rank
 *  ratio (resolve_params), so rank 8 on a 32/16 preset trains with alpha 4, not 16. */
export function effectiveAlpha() {
    const changed = changedNumber("network_alpha")
    if (changed !== undefined) return changed
    const p = baseValues()
    if (typeof p.network_alpha !== "number" || !p.network_dim) return p.network_alpha
    const dim = effectiveDim()
    return dim === p.network_dim ? p.network_alpha : (dim * p.network_alpha) / p.network_dim
}
/** The cross-field checks of the daemon's _check_relations that the tab's fields can break. */
function relationsIssue() {
    const dim = effectiveDim()
    const alpha = effectiveAlpha()
    if (typeof alpha === "number" && dim && !(alpha > 0 && alpha <= dim)) {
        return { key: state.paramsDirty.has("network_alpha") ? "network_alpha" : "network_dim", text: "Network alpha must be above 0 and at most the rank (" + dim + ")." }
    }
    const maxLr = ADAPTIVE_OPTIMIZERS.includes(baseValues().optimizer) ? MAX_ADAPTIVE_LR : MAX_LR
    const unet = changedNumber("unet_lr")
    if (unet !== undefined && !(unet > 0 && unet <= maxLr)) return { key: "unet_lr", text: "U-Net learning rate must be above 0 and at most " + maxLr + "." }
    const te = changedNumber("text_encoder_lr")
    if (te !== undefined && !(te >= 0 && te <= maxLr)) return { key: "text_encoder_lr", text: "Text encoder learning rate must be from 0 (not trained) to " + maxLr + "." }
    return null
}
export function effectiveEpochs() {
    const v = state.paramsDirty.has("epochs") ? readParam({ key: "epochs" }) : undefined
    return v !== undefined && Number.isInteger(v) && v >= 1 ? v : baseValues().epochs
}
/** The daemon trains on the CPU (no CUDA GPU, allow_cpu): /config/test says so in `device`. */
export function trainsOnCpu() {
    return !!(state.ready && state.ready.device === "cpu")
}
/** What an unchanged Advanced field shows: what the daemon will use when the key is not sent. */
export function paramDefault(f) {
    const p = baseValues()
    let v = p[f.key]
    if (f.key === "network_alpha") v = effectiveAlpha()
    if (f.key === "batch_size") v = effectiveBatch()
    if ((f.key === "unet_lr" || f.key === "text_encoder_lr") && currentFit()) {
        // /fit scaled the preset's rate to the tier's batch; a changed batch size scales it again, from the
        // preset's reference batch (the presets of the model's family, once they came)
        const preset = presetValues()
        if (preset.arch === p.arch && typeof preset[f.key] === "number") v = scaledLr(preset[f.key], effectiveBatch(), preset.batch_size, p.optimizer)
    }
    if (f.key === "sample_every_n_epochs") {
        // the daemon turns previews off on a CPU, and drops an interval the run never reaches
        if (trainsOnCpu()) v = 0
        const epochs = effectiveEpochs()
        if (typeof v === "number" && epochs && v > epochs) v = 0
    }
    return v === undefined || v === null ? "" : String(v)
}
export function collectParams() {
    const params = { preset: ui.preset.value || state.defaultPreset }
    for (const f of PARAM_FIELDS) {
        if (!state.paramsDirty.has(f.key)) continue
        const v = readParam(f)
        if (v !== undefined) params[f.key] = v
    }
    // Automatic is the daemon's default: only a chosen tier is sent (a daemon without /fit knows no tiers)
    if (state.memoryTier !== "auto" && !state.fitUnsupported) params.memory_tier = state.memoryTier
    // the face crop (face-crop.js): only when on and the daemon can find faces; off is the daemon's default
    if (ui.faceCrop && ui.faceCrop.checked && !ui.faceCrop.disabled) params.face_crop = true
    return params
}
// Image views per epoch the daemon's default repeats aim at, per family (daemon/pipeline/params.py)
const VIEWS_PER_EPOCH = { sd1: 200, sdxl: 100 }
export function autoRepeats(n, arch) {
    const target = VIEWS_PER_EPOCH[arch] || VIEWS_PER_EPOCH.sd1
    return Math.max(1, Math.min(100, Math.round(target / Math.max(1, n))))
}
// kohya's bucket for a picture with bucket_no_upscale, as daemon/pipeline/buckets.py computes it: a picture
// larger than resolution² is scaled down keeping its shape (one side on the step), then both sides are
// rounded down to the step. Batches never mix buckets, so the step count is counted per bucket.
export function bucketOf(width, height, resolution) {
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
/** Steps of the run: the fitted batch size, resolution and repeats (/fit) with the user's Advanced changes. */
export function estimateSteps() {
    const p = baseValues()
    const val = (k) => (state.paramsDirty.has(k) && readParam({ key: k }) !== undefined ? readParam({ key: k }) : p[k])
    const n = state.images.length || MIN_IMAGES
    const repeats = state.paramsDirty.has("repeats") && readParam({ key: "repeats" }) ? readParam({ key: "repeats" }) : defaultRepeats(n)
    const epochs = val("epochs")
    const batch = effectiveBatch() || 1
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
