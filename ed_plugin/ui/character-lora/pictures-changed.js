// Whoever keeps data per picture (checks, face crops, captions, tags) hears when the form's pictures change.
const listeners = []

/** `fn(images)` runs after pictures were added or removed (the whole current list). */
export function onPicturesChanged(fn) {
    listeners.push(fn)
}
export function picturesChanged(images) {
    for (const fn of listeners) {
        try {
            fn(images)
        } catch (e) {
            console.error("character-lora: a pictures listener failed", e)
        }
    }
}
