// What the daemon did to keep a job going (issue 9): resume after a crash, out-of-memory retries, saved state on
// disk. Pure functions of the job JSON (job.recovery, job.resumable), so the panel and the tests read the same words.
import { ACTIVE } from "./constants.js"

/** The parts of the job's recovery record the tab shows, with the defaults of an older daemon that has none. */
export function recoveryOf(job) {
    const r = (job && job.recovery) || {}
    return {
        retries: Array.isArray(r.retries) ? r.retries : [],
        notices: Array.isArray(r.notices) ? r.notices.filter((n) => typeof n === "string" && n) : [],
        state_epoch: typeof r.state_epoch === "number" ? r.state_epoch : null,
        state_bytes: r.state_bytes > 0 ? r.state_bytes : 0,
    }
}

/** The daemon allows POST /jobs/{id}/resume (an interrupted job); an older daemon sends no `resumable`. */
export function canResume(job) {
    return !!(job && job.resumable === true && job.state === "interrupted")
}

function epochsOf(job) {
    const pr = (job && job.progress) || {}
    const p = (job && job.params) || {}
    return pr.epochs || p.epochs || null
}

/** What Resume will do: continue after the newest saved state, or train again from the first step. */
export function resumePlan(job) {
    const r = recoveryOf(job)
    if (r.state_epoch !== null && r.state_epoch > 0) {
        const total = epochsOf(job)
        return "Resume continues from epoch " + (r.state_epoch + 1) + (total ? " of " + total : "") +
            " (the state saved after epoch " + r.state_epoch + ")."
    }
    return "Resume starts again from the first step with the same pictures."
}

/** "84 MB": a size on disk in decimal units, as file managers show them. */
export function fmtBytes(bytes) {
    if (!(bytes > 0)) return "0 B"
    const units = ["B", "KB", "MB", "GB", "TB"]
    let value = bytes
    let i = 0
    while (value >= 1000 && i < units.length - 1) {
        value /= 1000
        i++
    }
    const digits = i === 0 || value >= 10 ? 0 : 1
    return value.toFixed(digits) + " " + units[i]
}

/** "saved state: 84 MB" while the job keeps a kohya state on disk; "" when it keeps none. */
export function stateSizeText(job) {
    const r = recoveryOf(job)
    return r.state_bytes ? "saved state: " + fmtBytes(r.state_bytes) : ""
}

/** The out-of-memory retry the job runs now, else null: the newest retry while the job is still going and nothing
 * happened since (a later resume after a crash is another run). */
export function activeRetry(job) {
    if (!job || !ACTIVE.includes(job.state)) return null
    const { retries, notices } = recoveryOf(job)
    const last = retries[retries.length - 1]
    if (!last || typeof last.message !== "string" || !last.message) return null
    return !notices.length || notices[notices.length - 1] === last.message ? last : null
}

/** The recovery sentences to list under the job, oldest first, less the one shown on its own (activeRetry). */
export function listedNotices(job) {
    const shown = activeRetry(job)
    const notices = recoveryOf(job).notices
    if (!shown) return notices
    const i = notices.lastIndexOf(shown.message)
    return i < 0 ? notices : notices.slice(0, i).concat(notices.slice(i + 1))
}

