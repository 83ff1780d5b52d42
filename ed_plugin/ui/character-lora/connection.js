// Connecting to the daemon: /character-lora/info, /health, /config/test, presets, models, jobs; the banner's problems.
import { INFO_URL, START_URL } from "./constants.js"
import { toast } from "./dom.js"
import { sleep } from "./format.js"
import { client, state, renderAll } from "./store.js"
import { ui } from "./views/ui.js"
import { mergeSnapshot } from "./events.js"
import { renderBanner } from "./views/banner.js"
import { renderPresets, renderBaseModels } from "./views/form.js"
import { resetFit } from "./fit.js"

export async function connect() {
    const gen = ++state.connectGen
    clearTimeout(state.pollTimer)
    resetFit()
    state.health = "checking"
    renderBanner()

    let info
    try {
        const res = await fetch(INFO_URL, { cache: "no-store" })
        if (res.status === 404) {
            return fail(gen, [
                {
                    title: "The Character LoRA server plugin is not loaded in Easy Diffusion.",
                    fix: "Run install_plugin.py, then restart Easy Diffusion (server plugins load at start-up).",
                },
            ])
        }
        if (!res.ok) {
            return fail(gen, [
                {
                    title: "Easy Diffusion answered " + res.status + " to " + INFO_URL + ".",
                    fix: "See Easy Diffusion's console for the Character LoRA plugin's error, then press Retry.",
                },
            ])
        }
        info = await res.json()
    } catch (e) {
        return fail(gen, [
            {
                title: "Easy Diffusion did not answer " + INFO_URL + ".",
                fix: "Check that Easy Diffusion is running, then press Retry.",
            },
        ])
    }
    if (gen !== state.connectGen) return
    state.info = info
    const daemon = info.daemon || {}
    client.configure(pageReachableUrl(daemon), daemon.token)
    const problems = (info.problems || []).map((p) => ({ title: p.error, fix: p.fix }))

    if (daemon.ours === false) {
        // a leftover daemon of another config answers on our port: it refuses our token (and maybe this page's
        // origin), but neither is what is wrong; info's problems say what answers there and how to end it
        return fail(gen, problems, { retrySoon: true })
    }

    // is this page allowed by the daemon's CORS list?
    const origins = Array.isArray(daemon.allowed_origins) ? daemon.allowed_origins.map((o) => o.replace(/\/+$/, "")) : null
    const originBlocked = !!origins && !origins.includes(window.location.origin)
    if (originBlocked) {
        problems.push({
            title: "The daemon does not accept calls from this page's address (" + window.location.origin + ").",
            fix:
                "Add " + window.location.origin + " to allowed_origins in " + (daemon.config_path || "the daemon config") +
                " and restart the daemon, or open Easy Diffusion at http://localhost:" + (window.location.port || "9000") + ".",
        })
    }

    try {
        await client.request("GET", "/health", null, { auth: false, timeoutMs: 4000 })
    } catch (e) {
        if (gen !== state.connectGen) return
        if (!(originBlocked && daemon.running)) problems.push(unreachableProblem(daemon, e))
        return fail(gen, problems, { retrySoon: true })
    }
    if (!daemon.token) {
        return fail(gen, problems.length ? problems : [{ title: "The daemon token is not known.", fix: "Run install_plugin.py again." }])
    }

    let test, presets, models
    try {
        ;[test, presets, models] = await Promise.all([
            client.request("POST", "/config/test", null, { timeoutMs: 30000 }),
            client.request("GET", "/presets"),
            client.request("GET", "/models").catch(() => null),
        ])
    } catch (e) {
        if (gen !== state.connectGen) return
        problems.push(requestProblem(e, daemon))
        return fail(gen, problems, { retrySoon: e.kind === "network" })
    }
    if (gen !== state.connectGen) return
    state.presets = (presets && presets.presets) || {}
    state.defaultPreset = (presets && presets.default) || Object.keys(state.presets)[0] || "balanced"
    state.daemonModels = models && Array.isArray(models.models) ? models.models : null
    if (models && Array.isArray(models.supported_archs)) state.supportedArchs = models.supported_archs
    state.ready = { ...test, ready: isReady(test) }
    for (const c of blockingChecks(test)) {
        problems.push({ title: c.name + ": " + (c.detail || "not ready"), fix: c.fix })
    }
    state.problems = problems
    state.health = "ok"
    renderPresets()
    renderBaseModels()
    renderBanner()
    await refreshJobs()
    client.socket.open()
    renderAll()
}

/** Failing checks that stop training. The tab always sends a base model, so the daemon's "no default
    base_model" check does not matter while the daemon sees models in ED's folder. */
export function blockingChecks(test) {
    const haveModels = !!(state.daemonModels && state.daemonModels.length)
    return (test.checks || []).filter((c) => !c.ok && !(c.name === "base_model" && haveModels))
}
export function isReady(test) {
    return !!test && (test.ready || blockingChecks(test).length === 0)
}
export function fail(gen, problems, { retrySoon = false } = {}) {
    if (gen !== state.connectGen) return
    state.health = "down"
    state.problems = problems
    state.ready = null
    renderAll()
    if (retrySoon) {
        // the daemon may still be starting (autostart): try again quietly
        const delay = state.info && state.info.daemon && state.info.daemon.start && state.info.daemon.start.state === "starting" ? 2000 : 8000
        state.pollTimer = setTimeout(() => {
            if (gen === state.connectGen) connect()
        }, delay)
    }
}
/** The daemon's URL as this browser reaches it (a daemon on 0.0.0.0 is reached through ED's host name). */
export function pageReachableUrl(daemon) {
    const url = daemon.url
    if (!url) return null
    const listenAll = daemon.listen_host === "0.0.0.0" || daemon.listen_host === "::"
    const pageHost = window.location.hostname
    const local = ["localhost", "127.0.0.1", "[::1]", "::1"]
    if (listenAll && !local.includes(pageHost)) {
        try {
            const u = new URL(url)
            u.hostname = pageHost
            return u.toString()
        } catch (e) {
            return url
        }
    }
    return url
}
export function unreachableProblem(daemon, err) {
    const start = daemon.start || {}
    const local = ["localhost", "127.0.0.1", "[::1]", "::1"]
    if (daemon.running) {
        return {
            title: "The daemon is running, but this page may not call it (" + window.location.origin + ").",
            fix:
                "Add " + window.location.origin + " to allowed_origins in " + (daemon.config_path || "the daemon config") +
                ", then restart the daemon (or run install_plugin.py again).",
        }
    }
    if (!local.includes(window.location.hostname) && !["0.0.0.0", "::"].includes(daemon.listen_host)) {
        return {
            title: "Easy Diffusion is opened from another computer, but the daemon only listens on " + (daemon.listen_host || "127.0.0.1") + ".",
            fix: "Open Easy Diffusion on the computer that runs it (http://localhost:" + (window.location.port || "9000") + "), or set host: 0.0.0.0 in the daemon config and add this address to allowed_origins.",
        }
    }
    let fix
    if (start.state === "starting" || start.state === "checking") {
        return { title: "The training daemon is starting…", fix: "This takes a few seconds; the tab connects by itself.", waiting: true }
    } else if (start.state === "failed" || start.state === "exited") {
        fix = (start.error || "Starting it failed.") + (start.log ? " Log: " + start.log + "." : "") + " Fix the problem, then press Start daemon."
    } else if (daemon.can_start) {
        fix = "Press Start daemon, or run: " + daemon.start_command
    } else {
        fix = "Start it (python -m daemon --config <config>) or run install_plugin.py, then press Retry."
    }
    return {
        title: "The training daemon is not running at " + (client.url || daemon.url || "its address") + ".",
        fix,
        canStart: !!daemon.can_start,
    }
}
export function requestProblem(err, daemon) {
    if (err.status === 401) {
        return {
            title: "The daemon refused the token (" + err.message + ")",
            fix: "The token in " + (daemon.config_path || "the daemon config") + " changed: restart the daemon, then press Retry.",
        }
    }
    if (err.status === 403) {
        return { title: err.message, fix: err.hint || "Add this page's address to allowed_origins in the daemon config." }
    }
    if (err.kind === "network") return unreachableProblem(daemon || {}, err)
    return { title: err.message, fix: err.hint || "See the daemon's console output." }
}
export async function startDaemon() {
    ui.bannerStart && (ui.bannerStart.disabled = true)
    try {
        const res = await fetch(START_URL, { method: "POST", cache: "no-store" })
        const data = await res.json().catch(() => ({}))
        if (!res.ok) {
            toast((data.start && data.start.error) || data.error || "The daemon could not be started.", true)
        }
    } catch (e) {
        toast("Easy Diffusion did not answer " + START_URL + ".", true)
    }
    await sleep(1500)
    connect()
}
export async function refreshJobs() {
    try {
        const data = await client.request("GET", "/jobs")
        mergeSnapshot((data && data.jobs) || [])
    } catch (e) {
        /* the WebSocket snapshot will do */
    }
}
