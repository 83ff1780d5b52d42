// Per picture: what the daemon's checks found (POST /pictures/check), as badges on its card; the set's own
// warnings above the pictures. Advisory: they say what to do, and never stop the start.
import { el, icon, toast } from "../dom.js"
import { state } from "../store.js"
import { ui } from "./ui.js"
import "../picture-checks.js" // checks the pictures whenever they change

// Short: a card is 72 px wide; the whole sentence is in the badge's tooltip and toast.
const LABELS = { duplicate: "copy", small: "small", blurry: "blurry", unreadable: "broken" }

/** The picture's warnings, one badge each: the message and what to do in its tooltip, and in a toast on click. */
export function warningParts(img) {
    if (!Array.isArray(img.warnings) || !img.warnings.length) return []
    return [
        el(
            "div",
            { className: "clora-warns", attrs: { "data-clora": "picture-warnings" } },
            ...img.warnings.map((w) =>
                el(
                    "button",
                    {
                        className: "clora-warn",
                        attrs: { type: "button", "data-clora": "picture-warning", "data-code": w.code, title: w.message + "\n" + w.hint, "aria-label": w.message + " " + w.hint },
                        on: { click: (e) => { e.stopPropagation(); toast(w.message + " " + w.hint) } },
                    },
                    icon("fa-triangle-exclamation"),
                    " " + (LABELS[w.code] || w.code)
                )
            )
        ),
    ]
}

/** Above the pictures: the set's warnings, how many pictures have some, or why they could not be checked. */
export function renderPictureSet() {
    const node = setNode()
    if (!node) return
    const checks = state.pictureChecks
    const flagged = state.images.filter((i) => Array.isArray(i.warnings) && i.warnings.length).length
    const lines = []
    if (checks && !checks.unsupported && state.images.length) {
        for (const w of checks.set || []) {
            lines.push(el("div", { className: "clora-set-warn", attrs: { "data-clora": "set-warning", "data-code": w.code } }, icon("fa-circle-info"), " ", el("span", { text: w.message }), " ", el("span", { className: "clora-set-hint", text: w.hint })))
        }
        if (flagged) {
            lines.push(el("div", { className: "clora-help", attrs: { "data-clora": "picture-warnings-note" }, text: flagged + " of " + state.images.length + " pictures have warnings (point at or click a badge for what to do). They are advice: Start works with them." }))
        }
        if (checks.error) lines.push(el("div", { className: "clora-help", attrs: { "data-clora": "picture-check-error" }, text: "The pictures could not be checked: " + checks.error }))
        else if (checks.checking) lines.push(el("div", { className: "clora-help", text: "Checking the pictures…" }))
    }
    node.replaceChildren(...lines)
    node.hidden = !lines.length
}

function setNode() {
    if (!ui.thumbs || !ui.thumbs.parentNode) return null
    if (!ui.pictureSet || ui.pictureSet.parentNode !== ui.thumbs.parentNode) {
        ui.pictureSet = el("div", { className: "clora-picture-set", attrs: { "data-clora": "picture-set", "aria-live": "polite" } })
        ui.thumbs.parentNode.insertBefore(ui.pictureSet, ui.thumbs)
    }
    return ui.pictureSet
}
