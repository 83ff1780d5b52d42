// Automatic tags: kohya's WD14 tagger run by the daemon (GET /tagger, /tagger/runs), and the user's choice of tags,
// written into each picture's caption (img.caption, the part after "<trigger> <class>").
//
// Caption rule: a caption is a comma-separated list. Applying tags removes the words the tagger gave that picture
// (all of them, kept or not, also from an earlier run), keeps every other word the user typed, in place and first,
// then appends the kept tags in the tagger's order.
import { client, state, scheduleRender } from "./store.js"
import { onPicturesChanged } from "./pictures-changed.js"
import { renderImages } from "./views/pictures.js"

export const DEFAULT_THRESHOLD = 0.35
const POLL_MS = 500

export const tagger = {
    ready: null, // GET /tagger: {available, model_cached, repo_id, model_dir, problems}
    asking: false,
    readyError: null, // the daemon could not be asked
    run: null, // {task_id, state, phase, done, total, ids}: the run in progress (ids: the pictures sent, in order)
    result: null, // {tags: [{tag, count, suggest_drop}], rule, ids}: the last finished run
    keep: new Map(), // tag -> kept (checkbox state)
    error: null, // the last failure, a sentence
    notice: null, // a non-error outcome (cancelled)
    threshold: DEFAULT_THRESHOLD,
}

/** Ask the daemon whether the tagger can run and whether its model is cached. */
export async function loadReadiness() {
    if (tagger.asking) return
    tagger.asking = true
    try {
        tagger.ready = await client.request("GET", "/tagger")
        tagger.readyError = null
    } catch (e) {
        // an older daemon has no tagger: say so instead of offering a button that cannot work
        tagger.readyError = e.status === 404 ? "This daemon has no automatic tags; update the plugin." : e.message
    } finally {
        tagger.asking = false
        scheduleRender()
    }
}

function splitCaption(text) {
    return String(text || "")
        .split(",")
        .map((w) => w.trim())
        .filter((w) => w)
}

/** The caption without the words in `tags`. */
export function withoutTags(caption, tags) {
    const drop = new Set(tags || [])
    return splitCaption(caption).filter((w) => !drop.has(w))
}

/** Write the kept tags into every tagged picture's caption (the rule at the top of this file). */
export function applyTags() {
    for (const img of state.images) {
        if (!Array.isArray(img.tags)) continue
        const kept = img.tags.filter((t) => tagger.keep.get(t) !== false)
        const mine = withoutTags(img.caption, img.tags)
        img.caption = mine.concat(kept.filter((t) => !mine.includes(t))).join(", ")
    }
    renderImages() // the picture cards show the captions
    scheduleRender()
}

export function setKeep(tag, kept) {
    tagger.keep.set(tag, kept)
    applyTags()
}

export function setThreshold(value) {
    const n = Number(value)
    if (Number.isFinite(n) && n >= 0.1 && n <= 0.9) tagger.threshold = n
}

export function isRunning() {
    return !!(tagger.run && tagger.run.state === "running")
}

/** Send the form's pictures (in their order) to the tagger. */
export async function startTagging() {
    const imgs = state.images.slice()
    if (!imgs.length || isRunning()) return
    const form = new FormData()
    form.append("threshold", String(tagger.threshold))
    for (const img of imgs) form.append("images", img.file, img.file.name)
    tagger.error = null
    tagger.notice = null
    const run = { task_id: null, state: "running", phase: "uploading", done: 0, total: imgs.length, ids: imgs.map((i) => i.id) }
    tagger.run = run
    scheduleRender()
    let answer
    try {
        answer = await client.request("POST", "/tagger/runs", form, { timeoutMs: 300000 })
    } catch (e) {
        if (tagger.run !== run) return // cancelled while uploading
        tagger.run = null
        tagger.error = e.message + (e.hint ? " " + e.hint : "")
        if (e.status === 503) loadReadiness()
        scheduleRender()
        return
    }
    run.task_id = answer.task_id
    if (tagger.run !== run) {
        // cancelled while the pictures were on their way: stop what the daemon just started
        client.request("DELETE", "/tagger/runs/" + encodeURIComponent(run.task_id)).catch(() => {})
        return
    }
    poll(run)
}

async function poll(run) {
    while (tagger.run === run) {
        await new Promise((r) => setTimeout(r, POLL_MS))
        if (tagger.run !== run) return
        let body
        try {
            body = await client.request("GET", "/tagger/runs/" + encodeURIComponent(run.task_id))
        } catch (e) {
            if (tagger.run !== run) return
            tagger.run = null
            tagger.error = e.status === 404 ? "The daemon restarted and forgot the tagging; run it again." : e.message
            scheduleRender()
            return
        }
        if (tagger.run !== run) return
        Object.assign(run, { state: body.state, phase: body.phase, done: body.done, total: body.total })
        if (body.state !== "running") finish(run, body)
        scheduleRender()
    }
}

function finish(run, body) {
    tagger.run = null
    client.request("DELETE", "/tagger/runs/" + encodeURIComponent(run.task_id)).catch(() => {}) // read: free it
    if (body.state !== "done") {
        tagger.error = body.error || "The tagging stopped (" + body.state + ")."
        return
    }
    const byId = new Map(state.images.map((img) => [img.id, img]))
    run.ids.forEach((id, index) => {
        const img = byId.get(id)
        const picture = (body.pictures || [])[index]
        if (!img || !picture) return
        img.caption = withoutTags(img.caption, img.tags).join(", ") // the previous run's tags go
        img.tags = picture.tags.slice()
    })
    tagger.result = { tags: body.tags || [], rule: body.rule || "", ids: run.ids.slice() }
    tagger.keep = new Map(tagger.result.tags.map((t) => [t.tag, !t.suggest_drop]))
    applyTags()
    if (tagger.ready && !tagger.ready.model_cached) loadReadiness() // downloaded now
}

/** Stop the run (the daemon kills the tagger's processes) and forget it. */
export async function cancelTagging() {
    const run = tagger.run
    if (!run) return
    tagger.run = null
    tagger.notice = "Tagging cancelled."
    scheduleRender()
    if (!run.task_id) return
    try {
        await client.request("DELETE", "/tagger/runs/" + encodeURIComponent(run.task_id), null, { timeoutMs: 30000 })
    } catch (e) {
        if (e.status !== 404) tagger.error = "Cancelling failed: " + e.message
        scheduleRender()
    }
}

/** Pictures in the form the last run did not tag (added since). */
export function untaggedCount() {
    return state.images.filter((img) => !Array.isArray(img.tags)).length
}

client.socket.addEventListener("frame", (ev) => {
    const frame = ev.detail || {}
    const data = frame.data || {}
    const run = tagger.run
    // live progress between two polls; the poll reads the result
    if (frame.type !== "tagging" || !run || data.task_id !== run.task_id || data.state !== "running") return
    run.phase = data.phase || run.phase
    run.done = typeof data.done === "number" ? data.done : run.done
    scheduleRender()
})

onPicturesChanged((images) => {
    if (!images.length) {
        tagger.result = null
        tagger.keep = new Map()
        tagger.notice = null
    }
    scheduleRender()
})
