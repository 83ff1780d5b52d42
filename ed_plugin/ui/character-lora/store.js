// The tab's state (daemon info, jobs, the form's pictures) and the daemon client. Views subscribe; a change
// calls scheduleRender(), which runs every subscribed view once per frame, in the order they subscribed.
import { ACTIVE } from "./constants.js"
import { loadHandled } from "./handled.js"
import { DaemonClient } from "./api.js"

export const client = new DaemonClient()
export const state = {
    info: null,
    health: "unknown", // unknown | checking | ok | down
    problems: [], // [{title, detail, fix, actions}]
    ready: null, // result of /config/test
    presets: {},
    defaultPreset: "balanced",
    daemonModels: null, // [{id, file, arch}]
    supportedArchs: ["sd1"],
    presetsByArch: {}, // arch -> presets (GET /presets?arch=), besides `presets` (sd1, from connect)
    memoryTier: "auto", // Advanced's "Memory tier": auto or a tier id, sent as params.memory_tier
    fit: null, // {key, base, data, error}: the daemon's GET /fit answer for the form (see fit.js)
    fitUnsupported: false, // the daemon has no /fit (older than the memory tiers)
    tiers: [], // [{id, label}] from /fit
    fitGpu: null, // /fit's `gpu`: {cuda, name, vram_gb, bf16}
    autoTier: null, // the label of the tier the daemon picks by itself, for the Automatic option
    jobs: new Map(),
    selectedId: null,
    userSelected: false,
    handled: loadHandled(),
    images: [], // {id, file, url, width, height, problem}
    imageSeq: 0,
    submitting: false,
    paramsDirty: new Set(),
    baseModelTouched: false,
    lastSeq: null,
    connectGen: 0,
    pollTimer: null,
    wsStatus: "offline",
}
export function upsertJob(job) {
    if (!job || !job.id) return
    const prev = state.jobs.get(job.id)
    if (prev && prev.checkpoints && !job.checkpoints) job.checkpoints = prev.checkpoints
    // a job's previews only grow: keep one a `sample` frame brought that an older answer lacks
    job.samples = mergeSamples(job.samples, prev && prev.samples)
    state.jobs.set(job.id, job)
}
/** `base` (the daemon's order, oldest first) plus any of `extra` it lacks, by url. */
export function mergeSamples(base, extra) {
    const out = Array.isArray(base) ? base.filter((s) => s && s.url) : []
    const urls = new Set(out.map((s) => s.url))
    for (const s of Array.isArray(extra) ? extra : []) {
        if (s && s.url && !urls.has(s.url)) {
            urls.add(s.url)
            out.push(s)
        }
    }
    return out
}

export function sortedJobs() {
    return Array.from(state.jobs.values()).sort((a, b) => (b.created_at || 0) - (a.created_at || 0))
}

export function selectedJob() {
    if (state.userSelected && state.selectedId && state.jobs.has(state.selectedId)) return state.jobs.get(state.selectedId)
    const jobs = sortedJobs()
    const active = jobs.find((j) => ACTIVE.includes(j.state))
    if (active) return active
    if (state.selectedId && state.jobs.has(state.selectedId)) return state.jobs.get(state.selectedId)
    return jobs[0] || null
}
const views = []
let renderPending = false

/** A view: a function that brings its part of the tab up to date with the state (and does nothing before its
 * DOM exists). Runs on every renderAll(), after the views subscribed before it. */
export function subscribe(view) {
    views.push(view)
}

export function scheduleRender() {
    if (renderPending) return
    renderPending = true
    requestAnimationFrame(() => {
        renderPending = false
        renderAll()
    })
    // rAF does not run in background tabs; make sure the state still lands
    setTimeout(() => {
        if (renderPending) {
            renderPending = false
            renderAll()
        }
    }, 250)
}
export function renderAll() {
    for (const view of views) view()
}

// The views change the state only through these (the daemon's events and the controllers write the rest).

/** The user picked a job in the list: the panel shows it until they pick another. */
export function selectJob(id) {
    state.selectedId = id
    state.userSelected = true
    renderAll()
}

/** The daemon deleted the job: it leaves the list. */
export function forgetJob(id) {
    state.jobs.delete(id)
    scheduleRender()
}

/** The user chose a base model: stop following ED's current model. */
export function touchBaseModel() {
    state.baseModelTouched = true
}

/** An advanced field the user changed is sent with the job; the others come from the preset. */
export function markParamChanged(key) {
    state.paramsDirty.add(key)
}

export function resetParams() {
    state.paramsDirty.clear()
}
