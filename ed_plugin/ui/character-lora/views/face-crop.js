// Per picture: the face crop's frame over the picture (POST /pictures/faces), when the face crop is on.

/** Nodes drawn over the picture; none until the face crop is on. */
export function cropParts(img) {
    return []
}
