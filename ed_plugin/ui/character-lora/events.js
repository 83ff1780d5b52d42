// The daemon's WebSocket events applied to the state (job, progress, sample, log, notice, snapshot frames).
import { DETAILS_EVERY_MS, MAX_LOG_LINES } from "./constants.js"
import { isFinished } from "./format.js"
import { client, state, upsertJob, mergeSamples, scheduleRender } from "./store.js"
import { connect, refreshJobs } from "./connection.js"
import { onFinished, finishQuietly } from "./use-lora.js"
import { renderConnection } from "./views/banner.js"
import { applyLossFrame, checkpointAnnounced, forgetJob as forgetEpochs, jobEnded, reloadAll } from "./checkpoints.js"

client.socket.addEventListener("open", () => {
    state.wsStatus = "live"
    renderConnection()
    refreshJobs() // catch up on anything missed while disconnected
})
client.socket.addEventListener("close", (ev) => {
    state.wsStatus = "reconnecting"
    renderConnection()
    if (ev.detail && ev.detail.wasConnected) {
        // the daemon may have gone away: re-check (banner) without dropping the jobs we show
        setTimeout(() => {
            if (!client.socket.connected) checkHealthQuietly()
        }, 1500)
    }
})
client.socket.addEventListener("frame", (ev) => handleFrame(ev.detail))
export async function checkHealthQuietly() {
    try {
        await client.request("GET", "/health", null, { auth: false, timeoutMs: 3000 })
    } catch (e) {
        connect() // re-reads /character-lora/info (start state, running) and shows what is wrong
    }
}
export function handleFrame(frame) {
    if (typeof frame.seq === "number") {
        if (state.lastSeq !== null && frame.type !== "snapshot" && frame.seq > state.lastSeq + 1) {
            refreshJobs() // a gap: fetch the truth
        }
        state.lastSeq = frame.seq
    }
    const data = frame.data || {}
    const id = frame.job_id
    if (state.health !== "ok" && frame.type === "snapshot") {
        // the socket is back although the last health check failed: re-run the checks
        connect()
    }
    switch (frame.type) {
        case "snapshot":
            mergeSnapshot(data.jobs || [])
            reloadAll() // frames may have been missed while disconnected: the panel's job asks again
            break
        case "job_created":
            upsertJob(data)
            if (!state.userSelected) state.selectedId = data.id
            break
        case "state":
        case "result": {
            const job = jobOrFetch(id)
            if (!job) break
            for (const k of ["state", "error", "artifact", "lora_id", "resumable"]) if (k in data) job[k] = data[k]
            // the daemon's rule (Job.resumable) for a `state` frame that does not carry it
            if ("state" in data && !("resumable" in data)) job.resumable = data.state === "interrupted"
            if (frame.ts) job.updated_at = frame.ts
            if (frame.type === "result" || isFinished(job)) {
                onFinished(job, true)
                jobEnded(job.id)
                refreshDetails(job.id) // a finished job's saved state is deleted: its size goes
            }
            break
        }
        case "progress": {
            const job = jobOrFetch(id)
            if (!job) break
            job.progress = Object.assign({}, job.progress || {}, data)
            // the daemon stores the saved state's size as kohya writes it, without a frame of its own
            refreshDetailsEvery(id, DETAILS_EVERY_MS)
            break
        }
        case "log": {
            const job = jobOrFetch(id)
            if (job) {
                job.logs = (job.logs || []).concat(data.lines || []).slice(-MAX_LOG_LINES)
            }
            break
        }
        case "checkpoint": {
            const job = jobOrFetch(id)
            if (job) job.checkpoints = (job.checkpoints || []).concat([data.file])
            if (id) checkpointAnnounced(id, data.file)
            break
        }
        case "loss": {
            if (id) applyLossFrame(id, data)
            break
        }
        case "notice": {
            // a recovery action (resumed, auto_resumed, oom_retry): the record it carries replaces ours
            const job = jobOrFetch(id)
            if (!job) break
            framed.set(id, (framed.get(id) || 0) + 1)
            if (data.recovery) job.recovery = data.recovery
            else if (data.message) {
                const r = Object.assign({ notices: [] }, job.recovery || {})
                r.notices = (r.notices || []).concat([data.message])
                job.recovery = r
            }
            if (data.params) job.params = data.params
            else if (data.kind === "oom_retry") refreshDetails(id) // the retry runs with other params
            break
        }
        case "sample": {
            const job = jobOrFetch(id)
            if (job && data.url) job.samples = mergeSamples(job.samples, [{ file: data.file, url: data.url }])
            break
        }
        case "job_deleted":
            state.jobs.delete(id)
            forgetEpochs(id)
            if (state.selectedId === id) {
                state.selectedId = null
                state.userSelected = false
            }
            break
        default:
            break
    }
    scheduleRender()
}
export function jobOrFetch(id) {
    const job = id && state.jobs.get(id)
    if (job) return job
    if (id) {
        client
            .request("GET", "/jobs/" + encodeURIComponent(id) + "/status")
            .then((j) => {
                upsertJob(j)
                if (isFinished(j)) onFinished(j, true)
                scheduleRender()
            })
            .catch(() => {})
    }
    return null
}
const lastDetails = new Map() // job id -> Date.now() of its last refreshDetails
const framed = new Map() // job id -> notice frames seen, so that an older answer does not undo one
/** refreshDetails at most once per `ms` for a job. */
export function refreshDetailsEvery(id, ms) {
    const now = Date.now()
    if (now - (lastDetails.get(id) || 0) < ms) return
    lastDetails.set(id, now)
    refreshDetails(id)
}
/** Fetch a job's params and recovery record (which no frame but `notice` carries) and merge them in; the rest
 * of the job keeps following the frames, which may be newer than this answer. */
export function refreshDetails(id) {
    const seen = framed.get(id) || 0
    client
        .request("GET", "/jobs/" + encodeURIComponent(id) + "/status")
        .then((j) => {
            const job = state.jobs.get(id)
            // a notice frame that came meanwhile is newer than this answer
            if (!job || !j || (framed.get(id) || 0) !== seen) return
            for (const k of ["params", "recovery"]) if (k in j) job[k] = j[k]
            scheduleRender()
        })
        .catch(() => {}) // the next frame or snapshot brings them
}
/** A full list of jobs (WebSocket snapshot or GET /jobs): the daemon's word replaces ours. */
export function mergeSnapshot(jobs) {
    const ids = new Set()
    for (const job of jobs) {
        ids.add(job.id)
        upsertJob(job)
    }
    for (const id of Array.from(state.jobs.keys())) if (!ids.has(id)) state.jobs.delete(id)
    // jobs that finished while this page was closed or disconnected
    const missed = jobs.filter((j) => j.state === "done" && j.lora_id && !state.handled.has(j.id))
    if (missed.length) finishQuietly(missed)
    scheduleRender()
}
