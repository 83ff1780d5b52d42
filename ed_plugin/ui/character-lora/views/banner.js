// The connection badge and the banner of problems with their fixes.
import { el, icon } from "../dom.js"
import { client, state } from "../store.js"
import { ui } from "./ui.js"
import { connect, startDaemon } from "../connection.js"

export function renderConnection() {
    if (!ui.conn) return
    const status = state.health !== "ok" ? "offline" : client.socket.connected ? "live" : "reconnecting"
    ui.conn.dataset.status = status
    ui.conn.lastChild.textContent =
        status === "live" ? "Daemon: connected" : status === "reconnecting" ? "Daemon: reconnecting…" : state.health === "checking" ? "Daemon: checking…" : "Daemon: not connected"
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
