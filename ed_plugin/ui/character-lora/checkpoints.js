// A job's loss history and saved epochs, fetched from the daemon and kept up to date by its frames; publishing
// an epoch into ED's LoRA folder and using it.
import { toast } from "./dom.js"
import { isFinished } from "./format.js"
import { dropAfterEpoch, mergePoints } from "./loss-series.js"
import { client, state, scheduleRender } from "./store.js"
import { refreshEdModels, storeKeywords, useLora, edKnowsLora } from "./use-lora.js"

const CHECKPOINT_RETRY_MS = 1000 // kohya announces a file before it writes it: ask again until it is listed
const CHECKPOINT_RETRIES = 120
const RETRY_AFTER_FAILURE_MS = 5000

export const losses = new Map() // job id -> {points, total, epochs, loaded, loading, gen}
export const saved = new Map() // job id -> {rows, bytes, loaded, loading, error, waiting: Set(file), tries}
export const publishing = new Map() // job id + "|" + epoch -> true while a publish request runs; or {error}

function lossOf(jobId) {
    let entry = losses.get(jobId)
    if (!entry) {
        entry = { points: [], total: null, epochs: null, loaded: false, loading: false, during: [] }
        losses.set(jobId, entry)
    }
    return entry
}
function applyTo(points, data) {
    if (typeof data.cleared_after_epoch === "number") points = dropAfterEpoch(points, data.cleared_after_epoch)
    if (Array.isArray(data.points) && data.points.length) points = mergePoints(points, data.points)
    return points
}
/** The job's loss history from GET /jobs/{id}/loss (again after a reconnect); frames keep it current. */
export function ensureLoss(jobId) {
    const entry = lossOf(jobId)
    if (entry.loaded || entry.loading || Date.now() - (entry.failedAt || 0) < RETRY_AFTER_FAILURE_MS) return entry
    entry.loading = true
    entry.during = []
    client
        .request("GET", "/jobs/" + encodeURIComponent(jobId) + "/loss")
        .then((body) => {
            // the daemon's word, then the frames that came while it answered (they are newer)
            let points = mergePoints([], body.points || [])
            for (const data of entry.during) points = applyTo(points, data)
            entry.points = points
            entry.total = body.total
            entry.epochs = body.epochs
            entry.loaded = true
        })
        .catch(() => {
            entry.failedAt = Date.now() // a render after that asks again
        })
        .finally(() => {
            entry.loading = false
            entry.during = []
            scheduleRender()
        })
    return entry
}
/** A `loss` frame: new points, or (cleared_after_epoch) a launch that trains those epochs again. */
export function applyLossFrame(jobId, data) {
    const entry = lossOf(jobId)
    if (entry.loading) entry.during.push(data)
    entry.points = applyTo(entry.points, data)
    const job = state.jobs.get(jobId)
    if (job && job.progress && job.progress.total) entry.total = job.progress.total
}
/** Forget what a deleted job had; a reconnect (lost frames) fetches the selected job's history again. */
export function forgetJob(jobId) {
    losses.delete(jobId)
    saved.delete(jobId)
}
export function reloadAll() {
    for (const entry of losses.values()) entry.loaded = false
    for (const entry of saved.values()) entry.loaded = false
}

function savedOf(jobId) {
    let entry = saved.get(jobId)
    if (!entry) {
        entry = { rows: [], bytes: 0, loaded: false, loading: false, error: null, waiting: new Set(), tries: 0, timer: null }
        saved.set(jobId, entry)
    }
    return entry
}
/** GET /jobs/{id}/checkpoints; asked again while a file a `checkpoint` frame announced is not listed yet. */
export function loadCheckpoints(jobId, { force = false } = {}) {
    const entry = savedOf(jobId)
    if (entry.loading || (entry.loaded && !force)) return entry
    if (!force && Date.now() - (entry.failedAt || 0) < RETRY_AFTER_FAILURE_MS) return entry
    entry.loading = true
    client
        .request("GET", "/jobs/" + encodeURIComponent(jobId) + "/checkpoints")
        .then((body) => {
            entry.rows = Array.isArray(body.checkpoints) ? body.checkpoints : []
            entry.bytes = body.bytes || 0
            entry.error = null
            for (const row of entry.rows) entry.waiting.delete(row.file)
        })
        .catch((e) => {
            entry.error = e.message
            entry.failedAt = Date.now()
        })
        .finally(() => {
            entry.loading = false
            entry.loaded = true
            const job = state.jobs.get(jobId)
            if (entry.waiting.size && job && entry.tries < CHECKPOINT_RETRIES && !entry.timer) {
                entry.tries += 1
                entry.timer = setTimeout(() => {
                    entry.timer = null
                    loadCheckpoints(jobId, { force: true })
                }, CHECKPOINT_RETRY_MS)
            }
            scheduleRender()
        })
    return entry
}
/** A `checkpoint` frame: kohya started saving `file`; it is listed once the daemon sees it complete. */
export function checkpointAnnounced(jobId, file) {
    const entry = savedOf(jobId)
    if (file) entry.waiting.add(file)
    entry.tries = 0
    if (entry.loaded || entry.loading) loadCheckpoints(jobId, { force: true })
}
/** The job ended: its final file is there (or not), and previews may have come: list again. */
export function jobEnded(jobId) {
    if (saved.has(jobId)) loadCheckpoints(jobId, { force: true })
}

/** The job as "Use it" should see it for a published epoch: same trigger and model family, the epoch's LoRA id. */
export function epochJob(job, published) {
    return Object.assign({}, job, { lora_id: published.lora_id, artifact: published.artifact })
}
/** POST /jobs/{id}/checkpoints/{epoch}/publish, then ED's LoRA list refreshed and the trigger word stored. */
export async function publishEpoch(job, epoch) {
    const key = job.id + "|" + epoch
    if (publishing.get(key) === true) return
    publishing.set(key, true)
    scheduleRender()
    try {
        const body = await client.request("POST", "/jobs/" + encodeURIComponent(job.id) + "/checkpoints/" + epoch + "/publish", null, { timeoutMs: 120000 })
        try {
            await refreshEdModels()
            await storeKeywords(epochJob(job, body))
        } finally {
            // the card says "published" (and offers "Use it") only once ED lists the LoRA and has its trigger word
            for (const row of savedOf(job.id).rows) if (row.epoch === epoch) row.published = { lora_id: body.lora_id, artifact: body.artifact }
            publishing.delete(key)
        }
        if (edKnowsLora(body.lora_id) === false) {
            toast("Epoch " + epoch + " is published as " + body.lora_id + ", but Easy Diffusion does not list it yet. Check that the daemon's LoRA folder is Easy Diffusion's models/lora.", true)
        } else {
            toast("Epoch " + epoch + " of “" + job.name + "” is published as " + body.lora_id + ". Trigger word: " + job.trigger + ".")
        }
    } catch (e) {
        publishing.set(key, { error: "Could not publish epoch " + epoch + ": " + e.message + (e.hint ? " " + e.hint : "") })
    } finally {
        scheduleRender()
    }
}
export function useEpoch(job, published) {
    return useLora(epochJob(job, published))
}
/** Whether the panel should ask for the job's saved epochs now. */
export function wantsCheckpoints(job) {
    return !!job && (isFinished(job) || job.state === "training" || job.state === "copying")
}
