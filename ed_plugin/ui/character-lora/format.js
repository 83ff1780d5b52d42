import { FINISHED } from "./constants.js"

export function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–"
    seconds = Math.max(0, Math.round(seconds))
    const h = Math.floor(seconds / 3600)
    const m = Math.floor((seconds % 3600) / 60)
    const s = seconds % 60
    if (h) return h + "h " + String(m).padStart(2, "0") + "m"
    if (m) return m + "m " + String(s).padStart(2, "0") + "s"
    return s + "s"
}

export function fmtRate(rate) {
    if (!rate || !isFinite(rate)) return "–"
    return rate >= 1 ? rate.toFixed(2) + " it/s" : (1 / rate).toFixed(2) + " s/it"
}

export function fmtTime(ts) {
    if (!ts) return ""
    const d = new Date(ts * 1000)
    const now = new Date()
    const sameDay = d.toDateString() === now.toDateString()
    return sameDay ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : d.toLocaleDateString()
}

export function isFinished(job) {
    return FINISHED.includes(job && job.state)
}

export function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms))
}

export function archFromTags(tags) {
    const list = (tags || []).slice(1).map(String)
    for (const t of list) {
        if (t.startsWith("sd_v1")) return "sd1"
        if (t.startsWith("sd_v2")) return "sd2"
        if (t.startsWith("sd_xl") || t.startsWith("playground")) return "sdxl"
    }
    return list.length ? "other:" + list[0] : null
}
