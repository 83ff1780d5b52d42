// The daemon's WebSocket events applied to the state (job, progress, sample, log, snapshot frames).
import { MAX_LOG_LINES } from "./constants.js"
import { isFinished } from "./format.js"
import { client, state, upsertJob, mergeSamples, scheduleRender } from "./store.js"
import { connect, refreshJobs } from "./connection.js"
import { onFinished, finishQuietly } from "./use-lora.js"
import { renderConnection } from "./views/banner.js"

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
            break
        case "job_created":
            upsertJob(data)
            if (!state.userSelected) state.selectedId = data.id
            break
        case "state":
        case "result": {
            const job = jobOrFetch(id)
            if (!job) break
            for (const k of ["state", "error", "artifact", "lora_id"]) if (k in data) job[k] = data[k]
            if (frame.ts) job.updated_at = frame.ts
            if (frame.type === "result" || isFinished(job)) onFinished(job, true)
            break
        }
        case "progress": {
            const job = jobOrFetch(id)
            if (job) job.progress = Object.assign({}, job.progress || {}, data)
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
            break
        }
        case "sample": {
            const job = jobOrFetch(id)
            if (job && data.url) job.samples = mergeSamples(job.samples, [{ file: data.file, url: data.url }])
            break
        }
        case "job_deleted":
            state.jobs.delete(id)
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
