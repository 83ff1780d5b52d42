// Stop and Restart: the server plugin's token-guarded routes on ED's own origin (it starts the daemon again).
import { toast } from "./dom.js"
import { state, scheduleRender } from "./store.js"
import { connect } from "./connection.js"

export const STOP_URL = "/character-lora/stop"
export const RESTART_URL = "/character-lora/restart"
// "stopping" | "restarting" while a call runs (both block: up to 30 s / 90 s); the header's buttons show it
let busy = null
export const lifecycleBusy = () => busy

/** POST one of the plugin's lifecycle routes; the token is the one /character-lora/info gave. */
async function post(url) {
    const token = state.info && state.info.daemon && state.info.daemon.token
    let res
    try {
        res = await fetch(url, { method: "POST", cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} })
    } catch (e) {
        return { ok: false, data: { error: "Easy Diffusion did not answer " + url + "." } }
    }
    const data = await res.json().catch(() => ({}))
    return { ok: res.ok, status: res.status, data }
}

function failure(what, data) {
    const start = data.start || {}
    const sentence = data.error || start.error || "The daemon could not be " + what + "."
    return sentence + (data.hint ? " " + data.hint : "") + (start.log ? " Log: " + start.log + "." : "")
}

/** Runs `action` with the tab marked busy (the header's buttons read lifecycleBusy()), then re-reads /info and reconnects. */
async function withBusy(action, fn) {
    if (busy) return
    busy = action
    scheduleRender()
    try {
        await fn()
    } finally {
        busy = null
        scheduleRender()
        await connect()
    }
}

export function stopDaemon() {
    return withBusy("stopping", async () => {
        const { ok, data } = await post(STOP_URL)
        if (!ok) toast(failure("stopped", data), true)
        else if (data.stopped) toast("The training daemon stopped" + (data.pid ? " (process " + data.pid + ")" : "") + ". Press Start daemon to start it again.")
        else toast(data.message || "The training daemon was not running.")
    })
}

export function restartDaemon() {
    return withBusy("restarting", async () => {
        const { ok, data } = await post(RESTART_URL)
        if (!ok) toast(failure("restarted", data), true)
        else toast("The training daemon restarted" + (data.start && data.start.pid ? " (process " + data.start.pid + ")" : "") + ".")
    })
}
