// The training pictures picked or dropped in the form: probed for size, listed, removed.
import { MIN_SIDE, MAX_ASPECT } from "./constants.js"
import { state } from "./store.js"
import { ui } from "./views/ui.js"
import { renderForm } from "./views/form.js"
import { renderImages } from "./views/pictures.js"
import { picturesChanged } from "./pictures-changed.js"

export function addFiles(fileList) {
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
    picturesChanged(state.images)
}
export function probeImage(img) {
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
export function removeImage(id) {
    const idx = state.images.findIndex((i) => i.id === id)
    if (idx < 0) return
    URL.revokeObjectURL(state.images[idx].url)
    state.images.splice(idx, 1)
    ui.serverErrors.images.textContent = ""
    renderImages()
    renderForm()
    picturesChanged(state.images)
}
export function clearImages() {
    state.images.forEach((i) => URL.revokeObjectURL(i.url))
    state.images = []
    ui.imageNote.textContent = ""
    renderImages()
    picturesChanged(state.images)
}
