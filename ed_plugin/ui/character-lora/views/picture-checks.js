// Per picture: what the daemon's checks found (POST /pictures/check).

/** The picture's warnings under it. */
export function warningParts(img) {
    return []
}
