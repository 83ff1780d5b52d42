// How the run fits the card: the daemon's GET /fit for the form's model, preset, memory tier and picture count
// (the tier it picks and why, and the params /train would resolve), and the presets of each model family.
// A daemon without /fit (older than the memory tiers) answers 404: the tab then simply shows no tier line.
import { MIN_IMAGES, MAX_IMAGES, FIT_DEBOUNCE_MS } from "./constants.js"
import { client, state, scheduleRender } from "./store.js"
import { ui } from "./views/ui.js"

let timer = null
let pendingKey = null
let seq = 0

/** What GET /fit is asked for the form as it is now; null before a model is chosen or the daemon answers. */
export function fitQuery() {
    const base = ui.baseModel ? ui.baseModel.value : ""
    if (!base || state.health !== "ok" || state.fitUnsupported) return null
    // the count the step estimate uses: the pictures there are, or the fewest a job takes
    const images = Math.max(1, Math.min(MAX_IMAGES, state.images.length || MIN_IMAGES))
    return { base_model: base, preset: (ui.preset && ui.preset.value) || state.defaultPreset, memory_tier: state.memoryTier, images }
}

const keyOf = (q) => (q ? JSON.stringify(q) : null)

/** The key of the form's current /fit question (null when there is none to ask). */
export function fitKey() {
    return keyOf(fitQuery())
}

/** The daemon's /fit answer for exactly the form's current choices, else null (not asked yet, or outdated). */
export function currentFit() {
    const key = keyOf(fitQuery())
    return key && state.fit && state.fit.key === key && state.fit.data ? state.fit.data : null
}

/** The latest /fit answer (or error) for the chosen model, even while a newer one is on its way: the line
 * under the preset keeps its text instead of blinking at every change. */
export function shownFit() {
    const base = ui.baseModel ? ui.baseModel.value : ""
    return state.fit && state.fit.base === base ? state.fit : null
}

/** Asks /fit again when the form's choices changed (debounced: typing in a field or adding pictures one by
 * one sends one request). Called on every form render; cheap when nothing changed. */
export function ensureFit() {
    const q = fitQuery()
    const key = keyOf(q)
    if (!key || (state.fit && state.fit.key === key) || key === pendingKey) return
    pendingKey = key
    clearTimeout(timer)
    timer = setTimeout(() => fetchFit(q, key), FIT_DEBOUNCE_MS)
}

async function fetchFit(q, key) {
    const mine = ++seq
    const gen = state.connectGen
    try {
        const data = await client.request("GET", "/fit?" + new URLSearchParams(q).toString(), null, { timeoutMs: 15000 })
        if (mine !== seq || gen !== state.connectGen) return
        state.fit = { key, base: q.base_model, data, error: null }
        // the daemon picks the tier from the card alone (each family has its own settings per tier)
        if (data && data.auto && data.tier_label) state.autoTier = data.tier_label
        if (data && Array.isArray(data.tiers)) state.tiers = data.tiers
        if (data && data.gpu) state.fitGpu = data.gpu
    } catch (e) {
        if (mine !== seq || gen !== state.connectGen) return
        if (e.status === 404 || e.status === 405) {
            // an older daemon: no tiers; the form works as before
            state.fitUnsupported = true
            state.fit = null
        } else if (e.kind === "http") {
            state.fit = { key, base: q.base_model, data: null, error: e.message }
        } else {
            state.fit = null // no answer: asked again once the connection is back
        }
    } finally {
        if (mine === seq) pendingKey = null
        scheduleRender()
    }
}

/** Forget what the previous daemon said (a reconnect may reach another daemon, GPU or version). */
export function resetFit() {
    clearTimeout(timer)
    seq += 1
    pendingKey = null
    state.fit = null
    state.fitUnsupported = false
    state.fitGpu = null
    state.autoTier = null
    state.presetsByArch = {}
}

/** The presets of a model family (GET /presets?arch=), fetched once per family; the sd1 ones come with connect. */
export function ensurePresets(arch) {
    if (!arch || arch === "sd1" || !state.supportedArchs.includes(arch) || state.presetsByArch[arch]) return
    state.presetsByArch[arch] = "loading"
    const gen = state.connectGen
    client
        .request("GET", "/presets?arch=" + encodeURIComponent(arch))
        .then((res) => {
            if (gen !== state.connectGen) return
            state.presetsByArch[arch] = (res && res.presets) || {}
            scheduleRender()
        })
        .catch(() => {
            // the /fit params still give the family's values; not asked again until the next connect
            if (gen === state.connectGen) state.presetsByArch[arch] = "failed"
        })
}
