// Start training: the form sent to POST /jobs, and the daemon's field errors shown next to their fields.
import { toast } from "./dom.js"
import { client, state, renderAll } from "./store.js"
import { ui } from "./views/ui.js"
import { checkHealthQuietly } from "./events.js"
import { selectedBaseModel, baseModelArch, startBlocker, collectParams } from "./form-rules.js"
import { clearImages } from "./images.js"
import { renderForm } from "./views/form.js"
import { captionsField } from "./captions.js"

export async function submit() {
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
    const captions = captionsField(state.images)
    if (captions !== null) form.append("captions", captions) // aligned with the pictures, appended below in order
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
                params: { arch: baseModelArch(selectedBaseModel()) }, // until the daemon's record comes
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
export function clearServerErrors() {
    for (const node of Object.values(ui.serverErrors)) node.textContent = ""
    ui.startError.textContent = ""
}
export function showServerError(e) {
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
