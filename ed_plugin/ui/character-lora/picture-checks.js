// The daemon's warnings about the form's pictures (POST /pictures/check): asked for whenever pictures are added
// or removed (debounced) or the training resolution changes; advisory only: nothing here ever blocks Start.
import { client, state, subscribe } from "./store.js"
import { onPicturesChanged } from "./pictures-changed.js"
import { baseValues, readParam } from "./form-rules.js"
import { renderImages } from "./views/pictures.js"
import { renderPictureSet } from "./views/picture-checks.js"

// Pictures are usually added a few at a time (several drops, a picker then a drop): one request for the lot.
const DEBOUNCE_MS = 500
const TIMEOUT_MS = 120000

state.pictureChecks = {
    checking: false,
    set: [], // the set's warnings [{code, message, hint}] for the current list
    error: null, // a sentence when the daemon could not check them (never blocks anything)
    unsupported: false, // the daemon has no /pictures/check (older): nothing is shown
}
let timer = null
let generation = 0 // bumped for every new list: an answer for an older one is dropped
let askedResolution = null
let retryWhenUp = false // asked while the daemon was unknown or unreachable: ask again once it answers

/** The resolution the daemon will train at: a valid typed value, else the preset's (/fit's) one. */
export function trainingResolution() {
    const typed = state.paramsDirty.has("resolution") ? readParam({ key: "resolution" }) : undefined
    if (Number.isInteger(typed) && typed >= 256 && typed <= 1024) return typed
    const r = baseValues().resolution
    return Number.isInteger(r) ? r : 512
}

export function scheduleCheck() {
    generation += 1
    askedResolution = trainingResolution()
    clearTimeout(timer)
    timer = setTimeout(() => check(generation), DEBOUNCE_MS)
}
// One request at a time: a check holds one of the daemon's upload slots (max_uploads) while it runs, and Start's
// upload needs one too. A newer list waits for the running check's end (whose answer is then dropped).
let inFlight = false
let queued = false

async function check(gen) {
    if (gen !== generation) return
    if (inFlight) {
        queued = true
        return
    }
    inFlight = true
    try {
        await ask(gen)
    } finally {
        inFlight = false
        if (queued) {
            queued = false
            check(generation)
        }
    }
}

async function ask(gen) {
    const checks = state.pictureChecks
    const images = state.images.slice()
    if (!images.length || checks.unsupported || !client.url) {
        retryWhenUp = images.length > 0 && !checks.unsupported
        checks.set = []
        checks.error = null
        checks.checking = false
        renderPictureSet()
        return
    }
    const form = new FormData()
    for (const img of images) form.append("images", img.file, img.file.name)
    checks.checking = true
    renderPictureSet()
    try {
        const res = await client.request("POST", "/pictures/check?resolution=" + askedResolution, form, { timeoutMs: TIMEOUT_MS })
        if (gen !== generation) return
        applyAnswer(images, res)
        checks.error = null
    } catch (e) {
        if (gen !== generation) return
        if (e.status === 404 || e.status === 405) {
            checks.unsupported = true // an older daemon: the tab works as before, without warnings
            checks.error = null
        } else {
            checks.error = e.message
            retryWhenUp = e.kind === "network"
        }
        checks.set = []
    } finally {
        if (gen === generation) {
            checks.checking = false
            renderImages()
            renderPictureSet()
        }
    }
}

/** The daemon answers in upload order: picture i of the answer is images[i]; `others` become picture ids. */
function applyAnswer(images, res) {
    const pictures = (res && Array.isArray(res.pictures)) ? res.pictures : []
    images.forEach((img, i) => {
        const found = pictures.find((p) => p.index === i)
        img.warnings = found && Array.isArray(found.warnings)
            ? found.warnings.map((w) => ({
                code: String(w.code),
                message: String(w.message || ""),
                hint: String(w.hint || ""),
                others: (w.others || []).map((j) => images[j] && images[j].id).filter((id) => id !== undefined),
            }))
            : null
    })
    state.pictureChecks.set = Array.isArray(res && res.set) ? res.set : []
}

onPicturesChanged(() => scheduleCheck())
// A changed training resolution changes what is "small": check again (only when it really changed).
subscribe(() => {
    if (!state.images.length) return
    if (retryWhenUp && client.url && state.health === "ok") {
        retryWhenUp = false
        scheduleCheck()
    } else if (askedResolution !== null && trainingResolution() !== askedResolution) {
        scheduleCheck()
    }
})
