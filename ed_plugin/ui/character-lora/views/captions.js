// Per picture: its caption, the trigger first and fixed, the rest editable.

/** The caption editor under the picture. */
export function captionParts(img) {
    return []
}
