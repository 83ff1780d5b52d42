// Per picture: its caption, the trigger first and fixed (a locked chip that follows the trigger and class fields),
// the rest editable. A card is rebuilt on every picture change: a caption being typed keeps its focus and cursor.
import { el, icon } from "../dom.js"
import { ui } from "./ui.js"
import { MAX_CAPTION_CHARS, captionOf, setCaption, captionPrefix, repeatsTrigger } from "../captions.js"

const PREFIX_TITLE = "Always first in this picture's caption: the trigger word and the class word (change them above)."

function prefixText() {
    const { trigger, cls } = captionPrefix()
    return (trigger || "‹trigger›") + " " + cls + ","
}

function noteText(img) {
    const { trigger } = captionPrefix()
    return repeatsTrigger(captionOf(img), trigger) ? "“" + trigger + "” is already first; it is left out here." : ""
}

/** Brings every chip (and note) up to date while the trigger or class is typed, without rebuilding the cards. */
export function renderCaptionPrefixes() {
    if (!ui.thumbs) return
    const text = prefixText()
    for (const chip of ui.thumbs.querySelectorAll("[data-clora=caption-prefix] span")) chip.textContent = text
    for (const box of ui.thumbs.querySelectorAll("[data-clora=caption]")) {
        const note = box.querySelector("[data-clora=caption-note]")
        const img = box._img
        if (note && img) note.textContent = noteText(img)
    }
}

const followed = new WeakSet()
function followPrefixFields() {
    for (const input of [ui.trigger, ui.classWord]) {
        if (input && !followed.has(input)) {
            followed.add(input)
            input.addEventListener("input", renderCaptionPrefixes)
        }
    }
}

/** The caption editor under the picture. */
export function captionParts(img) {
    followPrefixFields()
    const name = img.file ? img.file.name : "picture"
    const note = el("div", { className: "clora-cap-note", attrs: { "data-clora": "caption-note", "aria-live": "polite" }, text: noteText(img) })
    const input = el("textarea", {
        className: "clora-cap-input",
        attrs: {
            rows: 2, maxlength: MAX_CAPTION_CHARS, spellcheck: "false", "data-clora": "caption-input", "data-caption-for": img.id,
            placeholder: "e.g. smiling, red scarf, outdoors", "aria-label": "Caption of " + name + " after the trigger and class word",
        },
    })
    input.value = captionOf(img)
    input.addEventListener("keydown", (e) => {
        if (e.key === "Enter") e.preventDefault() // one line: kohya reads only the first
    })
    input.addEventListener("input", () => {
        const start = input.selectionStart
        setCaption(img, input.value)
        if (input.value !== img.caption) {
            input.value = img.caption
            input.setSelectionRange(start, start)
        }
        note.textContent = noteText(img)
    })
    keepFocus(img, input)
    const box = el(
        "div",
        { className: "clora-cap", attrs: { "data-clora": "caption" } },
        el("div", { className: "clora-cap-prefix", attrs: { "data-clora": "caption-prefix", title: PREFIX_TITLE } }, icon("fa-lock"), el("span", { text: prefixText() })),
        input,
        note
    )
    box._img = img
    return [box]
}

// The card is replaced when anything about the pictures changes (a probe ends, a check or the tagger answers): the
// new editor takes over the focus and selection of the old one.
function keepFocus(img, input) {
    const active = document.activeElement
    if (!active || active.dataset.captionFor !== String(img.id) || !ui.thumbs || !ui.thumbs.contains(active)) return
    const start = active.selectionStart
    const end = active.selectionEnd
    queueMicrotask(() => {
        if (!input.isConnected) return
        input.focus({ preventScroll: true })
        input.setSelectionRange(Math.min(start, input.value.length), Math.min(end, input.value.length))
    })
}
