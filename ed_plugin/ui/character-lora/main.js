// The tab's entry module (loaded by character-lora.plugin.js from the server plugin's /character-lora/ui/ route):
// wires the views to the store and adds the tab to ED once ED's createTab exists.
import { VERSION, TAB_ID } from "./constants.js"
import { ed } from "./ed.js"
import { state, selectedJob, renderAll, subscribe } from "./store.js"
import { connect } from "./connection.js"
import { CSS } from "./views/css.js"
import { buildUI } from "./views/tab.js"
import { renderBaseModels, renderForm } from "./views/form.js"
import { renderConnection, renderBanner } from "./views/banner.js"
import { renderJobPanel } from "./views/job-panel.js"
import { renderJobList } from "./views/job-list.js"
import { ui } from "./views/ui.js"
import "./events.js" // the daemon's WebSocket events update the state from here on

// the views, in the order they draw; none draws before the tab's DOM exists
subscribe(() => ui.root && renderConnection())
subscribe(() => ui.root && renderBanner())
subscribe(() => ui.root && renderForm())
subscribe(() => ui.root && renderJobPanel())
subscribe(() => ui.root && renderJobList())

/** Fills the tab the loader made with ED's createTab (so the tab is there, in plugin order, as soon as ED has run
 * the plugins); false until it exists. */
function install() {
    const inner = document.getElementById(TAB_ID) // ED's .tab-content-inner of our tab
    if (!document.getElementById("tab-" + TAB_ID) || !inner) return false
    if (inner.querySelector("[data-clora=root]")) return true
    if (!document.getElementById("tab-" + TAB_ID + "-css")) {
        // where ED's createTab puts a tab's css
        const style = document.createElement("style")
        style.id = "tab-" + TAB_ID + "-css"
        style.textContent = CSS
        document.body.insertAdjacentElement("beforeend", style)
    }
    inner.replaceChildren(buildUI())
    window.CharacterLoRA.tab.onOpen = () => {
        // follow ED's current model until the user picks one here
        renderBaseModels()
        renderAll()
        if (state.health === "down") connect()
    }
    document.addEventListener("refreshModels", () => {
        renderBaseModels()
        renderForm()
    })
    const sd = ed.sdModelField()
    if (sd && typeof sd.addEventListener === "function") {
        sd.addEventListener("change", () => {
            if (!state.baseModelTouched) {
                renderBaseModels()
                renderForm()
            }
        })
    }
    connect()
    return true
}

const api = {
    loaded: true,
    version: VERSION,
    state,
    reconnect: () => connect(),
    /** for tests and other plugins: the job the panel shows */
    selectedJob: () => selectedJob(),
}
window.CharacterLoRA = Object.assign(window.CharacterLoRA || {}, api)

// ED runs plugins after its own scripts, but plugin managers may eval us earlier: wait for the loader's tab.
if (!install()) {
    let tries = 0
    const timer = setInterval(() => {
        tries += 1
        if (install() || tries > 600) clearInterval(timer)
    }, 100)
}
