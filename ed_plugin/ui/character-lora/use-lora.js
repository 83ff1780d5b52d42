// When a job is done: ED's LoRA list refreshed, the trigger word stored, "Use it" fills ED's fields.
import { DEFAULT_LORA_WEIGHT } from "./constants.js"
import { baseModelArch, archLabel } from "./form-rules.js"
import { ed } from "./ed.js"
import { toast } from "./dom.js"
import { saveHandled } from "./handled.js"
import { state, scheduleRender } from "./store.js"
import { field } from "./views/tab.js"

export const finishing = new Set()
export async function onFinished(job, live) {
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
export async function finishQuietly(jobs) {
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
export async function refreshEdModels() {
    const fn = ed.getModels()
    if (!fn) return
    try {
        await fn()
    } catch (e) {
        console.warn("[Character LoRA] getModels failed", e)
    }
}
export function edKnowsLora(id) {
    const db = ed.modelsDB()
    if (!db) return null
    return !!(db.lora && Object.prototype.hasOwnProperty.call(db.lora, id))
}
/** Add the trigger word to the LoRA's keywords in ED's Bucket, keeping whatever is already there. */
export async function storeKeywords(job) {
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
export async function useLora(job) {
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
    const model = matchEdModel(job)
    const select = ed.selectTab()
    if (select && document.getElementById("tab-main")) select("tab-main")
    if (selected) {
        toast("Selected LoRA " + job.lora_id + " (weight " + DEFAULT_LORA_WEIGHT + ") and added “" + job.trigger + "” to the prompt." + (model.note ? " " + model.note : ""), !!model.warn)
    } else {
        toast("Easy Diffusion does not list the LoRA " + job.lora_id + " yet; click the reload button next to the model list, then pick it under LoRA." + (model.note ? " " + model.note : ""), true)
    }
}


/** The daemon's entry ({id, file, arch}) of the checkpoint a job trained on: job.base_model is its absolute path. */
export function trainedOnModel(job) {
    const base = String((job && job.base_model) || "").replace(/\\/g, "/")
    if (!base || !state.daemonModels) return null
    return state.daemonModels.find((m) => {
        const dot = m.file.lastIndexOf(".")
        return base.endsWith("/" + m.id + (dot > 0 ? m.file.slice(dot) : ""))
    }) || null
}

/** The LoRA's architecture: the job's (params.arch, stored by the daemon since it trains SDXL), else its base
 * model's; jobs from before that were all SD 1.x. */
export function loraArch(job) {
    const arch = job && job.params && job.params.arch
    if (typeof arch === "string" && arch) return arch
    const m = trainedOnModel(job)
    return m && m.arch && m.arch !== "unknown" ? m.arch : "sd1"
}

/** The model id "Use it" should select for this LoRA, or null when ED's current model already fits (or none fits). */
export function pickModel(job, currentId, archOf) {
    const want = loraArch(job)
    const current = currentId ? archOf(currentId) : null
    if (current === want) return null
    const db = ed.modelsDB()
    const sdModels = db && db["stable-diffusion"]
    // only a model ED lists can be selected in its Model field
    const listed = (id) => archOf(id) === want && (!sdModels || Object.prototype.hasOwnProperty.call(sdModels, id))
    const trained = trainedOnModel(job)
    if (trained && listed(trained.id)) return trained.id
    const other = (state.daemonModels || []).find((m) => m.arch === want && listed(m.id))
    return other ? other.id : null
}

/** When ED's current model is not of the LoRA's architecture, select the model the LoRA was trained on (or
 * another of its architecture). {note, warn}: the sentence for the toast, empty when nothing changed. */
export function matchEdModel(job) {
    const sd = ed.sdModelField()
    if (!sd) return { note: "" }
    const want = loraArch(job)
    const before = sd.value || ""
    const beforeArch = before ? baseModelArch(before) : null
    // an unknown architecture (an untagged .ckpt the daemon cannot read either) is left as the user chose it
    if (beforeArch === want || beforeArch === "unknown") return { note: "" }
    const target = pickModel(job, before, baseModelArch)
    if (target) {
        try {
            sd.value = target
        } catch (e) {
            console.warn("[Character LoRA] could not set the model field", e)
        }
    }
    const what = before ? "The model " + before + " is " + archLabel(beforeArch) : "No model is selected"
    if (target && sd.value === target) {
        const why = trainedOnModel(job) && trainedOnModel(job).id === target ? ", the model it was trained on" : ""
        return { note: what + ", and this LoRA is " + archLabel(want) + ": switched the model to " + target + why + "." }
    }
    return { note: what + ", and this LoRA is " + archLabel(want) + ": pick an " + archLabel(want) + " model under Model; none is listed.", warn: true }
}
