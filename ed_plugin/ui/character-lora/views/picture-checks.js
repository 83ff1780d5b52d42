// Per picture: what the daemon's checks found (POST /pictures/check) and the face crop (POST /pictures/faces).

/** Nodes drawn over the picture (the face crop's frame); none until the face crop is on. */
export function cropParts(img) {
    return []
}
/** The picture's warnings under it. */
export function warningParts(img) {
    return []
}
