// The optional crop around the face: the form's checkbox, and POST /pictures/faces for the pictures while it is on.
// Each picture gets `face` and `crop` ({x, y, w, h} in its upright pixels, or null: no face, the whole picture is
// used) and `faceSize` (the upright size those boxes refer to); undefined = not asked yet. The daemon crops with the
// same boxes in prep when the job's params.face_crop is true (form-rules.js collectParams).
import { el } from "./dom.js"
import { client, state, subscribe, scheduleRender } from "./store.js"
import { ui } from "./views/ui.js"
import { onPicturesChanged } from "./pictures-changed.js"
import { renderImages } from "./views/pictures.js"
import { baseValues, readParam } from "./form-rules.js"

// The long side of a request: 25 camera pictures upload and go through the detector in the kohya venv.
const FACES_TIMEOUT_MS = 180000
let generation = 0

/** The checkbox with its reason line, placed in the form by views/tab.js. */
export function faceCropField() {
    ui.faceCrop = el("input", { attrs: { id: "clora-face-crop", type: "checkbox", "data-clora": "face-crop" } })
    ui.faceCrop.addEventListener("change", () => {
        note = null
        for (const img of state.images) delete img.face // asked again, for the current resolution
        if (faceCropOn()) detectFaces()
        renderImages()
        scheduleRender()
    })
    ui.faceCropNote = el("div", { className: "clora-help", attrs: { "data-clora": "face-crop-note" } })
    return el(
        "div",
        { className: "clora-face-crop" },
        el("label", { className: "clora-check" }, ui.faceCrop, " Crop around the face"),
        ui.faceCropNote
    )
}

/** The daemon's /config/test row (null before it answered, or from a daemon without the face crop). */
function readiness() {
    return (state.ready && state.ready.face_crop) || null
}

export function faceCropOn() {
    return !!(ui.faceCrop && ui.faceCrop.checked && !ui.faceCrop.disabled)
}

let note = null // a passing message under the checkbox: finding faces, or why none could be found
const pending = new Set() // pictures in a request now

function renderToggle() {
    if (!ui.faceCrop) return
    const row = readiness()
    const available = !!(row && row.ok)
    ui.faceCrop.disabled = !available
    if (!available && ui.faceCrop.checked) ui.faceCrop.checked = false
    ui.faceCrop.title = available ? "" : "Not available"
    ui.faceCropNote.textContent = available
        ? note || "For photos of people: each picture is cropped to head and shoulders around its face; a picture without a face is used whole."
        : row
          ? "Not available: " + row.detail.replace(/^face crop unavailable: /, "") + (row.fix ? " " + row.fix : "")
          : "Not available: the daemon has not said whether it can find faces."
}
subscribe(renderToggle)

/** The resolution the job trains at (the crop is at least that wide where a picture allows). */
function trainingResolution() {
    const typed = state.paramsDirty.has("resolution") ? readParam({ key: "resolution" }) : undefined
    const r = typed !== undefined ? typed : baseValues().resolution
    return Number.isInteger(r) && r >= 256 && r <= 2048 ? r : 512
}

/** Ask the daemon for the faces of the pictures not asked yet; answers for pictures removed meanwhile are dropped. */
export async function detectFaces() {
    const todo = state.images.filter((img) => img.face === undefined && !img.problem && !pending.has(img))
    if (!faceCropOn() || !todo.length) return
    const gen = ++generation
    const form = new FormData()
    for (const img of todo) {
        pending.add(img)
        form.append("images", img.file, img.file.name)
    }
    note = "Finding the faces in " + todo.length + " picture" + (todo.length === 1 ? "" : "s") + "…"
    renderToggle()
    try {
        const res = await client.request("POST", "/pictures/faces?resolution=" + trainingResolution(), form, { timeoutMs: FACES_TIMEOUT_MS })
        if (!faceCropOn()) return
        if (!res.available) {
            note = res.problem + " The pictures will be used whole."
            return
        }
        for (const p of res.pictures || []) {
            const img = todo[p.index]
            if (!img || !state.images.includes(img)) continue
            img.face = p.face || null
            img.crop = p.face ? p.crop : null
            img.faceSize = { width: p.width, height: p.height }
        }
        if (gen === generation) note = null
    } catch (e) {
        if (gen === generation) note = "The faces could not be found: " + e.message
    } finally {
        for (const img of todo) pending.delete(img)
        renderImages()
        scheduleRender()
    }
}

onPicturesChanged(() => {
    if (faceCropOn()) detectFaces()
})
