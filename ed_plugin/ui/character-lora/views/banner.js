// The connection badge with the daemon's Restart and Stop buttons, and the banner of problems with their fixes.
import { el, icon } from "../dom.js"
import { client, state } from "../store.js"
import { ui } from "./ui.js"
import { connect, startDaemon } from "../connection.js"
import { lifecycleBusy, restartDaemon, stopDaemon } from "../lifecycle.js"

/** The header's Restart and Stop buttons (buildUI places them next to the connection badge). */
export function lifecycleButtons() {
    ui.restart = el("button", { className: "tertiaryButton", attrs: { type: "button", "data-clora": "restart-daemon", title: "Stop the training daemon and start it again (it re-reads its config)" }, on: { click: restartDaemon } }, icon("fa-power-off"), el("span", { text: " Restart" }))
    ui.stop = el("button", { className: "tertiaryButton", attrs: { type: "button", "data-clora": "stop-daemon", title: "Stop the training daemon (a running job is interrupted)" }, on: { click: stopDaemon } }, icon("fa-stop"), el("span", { text: " Stop" }))
    return [ui.restart, ui.stop]
}
function renderLifecycle() {
    if (!ui.restart || !ui.stop) return
    const busy = lifecycleBusy()
    const daemon = (state.info && state.info.daemon) || {}
    // a leftover daemon of another config is not ours to stop: the banner says how to end it
    const ours = daemon.ours !== false
    ui.restart.disabled = !!busy || !ours || !daemon.can_start
    ui.stop.disabled = !!busy || !ours || !daemon.running
    for (const b of [ui.restart, ui.stop]) {
        // ED styles no disabled tertiaryButton: dim it here (css.js belongs to the form's layout)
        b.style.opacity = b.disabled ? "0.5" : ""
        b.style.cursor = b.disabled ? "not-allowed" : ""
    }
    ui.restart.lastChild.textContent = busy === "restarting" ? " Restarting…" : " Restart"
    ui.stop.lastChild.textContent = busy === "stopping" ? " Stopping…" : " Stop"
    if (ui.root) {
        if (busy) ui.root.dataset.busy = busy
        else delete ui.root.dataset.busy
    }
}

export function renderConnection() {
    if (!ui.conn) return
    renderLifecycle()
    const busy = lifecycleBusy()
    const status = state.health !== "ok" ? "offline" : client.socket.connected ? "live" : "reconnecting"
    ui.conn.dataset.status = status
    ui.conn.lastChild.textContent = busy
        ? "Daemon: " + busy + "…"
        : status === "live" ? "Daemon: connected" : status === "reconnecting" ? "Daemon: reconnecting…" : state.health === "checking" ? "Daemon: checking…" : "Daemon: not connected"
    if (ui.root) ui.root.dataset.ready = String(state.health === "ok" && !!(state.ready && state.ready.ready))
}
export function renderBanner() {
    if (!ui.banner) return
    const problems = state.problems || []
    if (state.health === "checking" && !problems.length) {
        ui.banner.hidden = true
        return
    }
    if (!problems.length) {
        ui.banner.hidden = true
        ui.banner.replaceChildren()
        return
    }
    const waiting = problems.every((p) => p.waiting)
    ui.banner.hidden = false
    ui.banner.classList.toggle("clora-waiting", waiting)
    const title =
        state.health === "down"
            ? "The training daemon is not available"
            : state.ready && !state.ready.ready
              ? "The training daemon is not ready to train"
              : "Character LoRA needs attention"
    const list = el(
        "ul",
        {},
        problems.map((p) => el("li", { attrs: { "data-clora": "problem" } }, el("span", { text: p.title }), p.fix ? el("span", { className: "clora-fix", text: "Fix: " + p.fix }) : null))
    )
    const buttons = [el("button", { className: "tertiaryButton", attrs: { type: "button", "data-clora": "retry" }, on: { click: () => connect() } }, icon("fa-rotate-right"), " Retry")]
    if (problems.some((p) => p.canStart)) {
        ui.bannerStart = el("button", { className: "primaryButton", attrs: { type: "button", "data-clora": "start-daemon" }, on: { click: startDaemon } }, icon("fa-play"), " Start daemon")
        buttons.push(ui.bannerStart)
    }
    ui.banner.replaceChildren(el("h4", {}, icon(waiting ? "fa-hourglass-half" : "fa-triangle-exclamation"), " " + title), list, el("div", {}, buttons))
}
