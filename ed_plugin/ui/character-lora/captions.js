// Per-picture captions: `img.caption` is the part after the fixed "<trigger> <class>" prefix (the one place it is
// kept: the caption editor and the tagger both write it). The daemon cleans it again and writes the caption file.
import { ui } from "./views/ui.js"
import { onPicturesChanged } from "./pictures-changed.js"

// The daemon's limit per caption (daemon/pipeline/captions.py MAX_CAPTION_CHARS).
export const MAX_CAPTION_CHARS = 1000
export const DEFAULT_CLASS = "person"

/** What the user typed for the picture ("" when nothing). */
export function captionOf(img) {
    return typeof img.caption === "string" ? img.caption : ""
}

/** One line: kohya reads only a caption file's first line, so a newline (typed or pasted) becomes a space. */
export function setCaption(img, text) {
    img.caption = String(text).replace(/[\r\n\u2028\u2029]+/g, " ").slice(0, MAX_CAPTION_CHARS)
}

/** The fixed start of every caption, as the form's trigger and class fields say now. */
export function captionPrefix() {
    const trigger = ui.trigger ? ui.trigger.value.trim() : ""
    const cls = ui.classWord ? ui.classWord.value.replace(/\s+/g, " ").trim() : ""
    return { trigger, cls: cls || DEFAULT_CLASS }
}

/** True when the text has the trigger again as a word or tag (the daemon leaves it out: it is already first). */
export function repeatsTrigger(text, trigger) {
    if (!trigger) return false
    const lower = trigger.toLowerCase()
    return text.toLowerCase().split(/[\s,]+/).includes(lower)
}

/** The POST /train `captions` field: one string per picture, in the order the pictures are sent; null when no
 * picture has one (the field is left out: every caption is then the prefix alone). */
export function captionsField(images) {
    return images.some((i) => captionOf(i).trim()) ? JSON.stringify(images.map(captionOf)) : null
}

// New pictures start with an empty caption; the others keep theirs (each lives on its own picture record).
onPicturesChanged((images) => {
    for (const img of images) if (typeof img.caption !== "string") img.caption = ""
})
