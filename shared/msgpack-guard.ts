// A strict structural check of a msgpack frame before any decoder sees it
// (docs/SPEC.md §3.3). Frames come from the network: a length or count field
// can claim anything up to 2^32−1. Decoders have been caught trusting them —
// msgpackr's native string extractor (msgpackr-extract 3.0.3) adds a str32
// length to its position in 32-bit arithmetic, wraps, and reads far outside
// the buffer: one 28-byte frame crashed the receiver with SIGSEGV. This walk
// uses plain numbers (no wrap-around), never allocates, and accepts only what
// the protocol uses:
//   - every declared length (str, bin) fits in the bytes that remain;
//   - every container's element count could fit (each element is ≥ 1 byte);
//   - nesting depth ≤ MAX_DEPTH;
//   - no extension types (ext, fixext, msgpackr records or bundled strings) and
//     no 0xc1;
//   - exactly one value, with no bytes after it.
import { TidemarkError } from './errors.js';

/** Protocol messages nest three deep (map → disks array → map); leave room, refuse absurd nesting. */
export const MAX_DEPTH = 16;

function malformed(reason: string): TidemarkError {
  return new TidemarkError('E_PROTOCOL', `frame is not valid msgpack: ${reason}`);
}

export function checkMsgpackFrame(buf: Uint8Array, maxDepth = MAX_DEPTH): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const end = buf.byteLength;
  let pos = 0;
  /** Items still to read in each open container; the bottom entry is the frame's one value. */
  const remaining: number[] = [1];
  const take = (bytes: number, what: string): number => {
    if (bytes > end - pos) throw malformed(`${what} of ${bytes} bytes at offset ${pos} runs past the end of the ${end}-byte frame`);
    const at = pos;
    pos += bytes;
    return at;
  };
  const uint = (bytes: 1 | 2 | 4, what: string): number => {
    const at = take(bytes, what);
    return bytes === 1 ? view.getUint8(at) : bytes === 2 ? view.getUint16(at) : view.getUint32(at);
  };
  const open = (items: number, what: string): void => {
    if (items > end - pos) throw malformed(`${what} claims ${items} elements but only ${end - pos} bytes remain`);
    if (items === 0) return;
    if (remaining.length > maxDepth) throw malformed(`nested deeper than ${maxDepth} levels`);
    remaining.push(items);
  };

  while (remaining.length > 0) {
    if (remaining[remaining.length - 1] === 0) {
      remaining.pop();
      continue;
    }
    remaining[remaining.length - 1]!--;
    const b = view.getUint8(take(1, 'a value'));
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) continue; // fixints, nil, booleans
    if (b <= 0x8f) open((b & 0x0f) * 2, 'a map');
    else if (b <= 0x9f) open(b & 0x0f, 'an array');
    else if (b <= 0xbf) take(b & 0x1f, 'a string');
    else {
      switch (b) {
        case 0xc4: take(uint(1, 'a length'), 'binary data'); break;
        case 0xc5: take(uint(2, 'a length'), 'binary data'); break;
        case 0xc6: take(uint(4, 'a length'), 'binary data'); break;
        case 0xd9: take(uint(1, 'a length'), 'a string'); break;
        case 0xda: take(uint(2, 'a length'), 'a string'); break;
        case 0xdb: take(uint(4, 'a length'), 'a string'); break;
        case 0xcc: case 0xd0: take(1, 'an integer'); break;
        case 0xcd: case 0xd1: take(2, 'an integer'); break;
        case 0xce: case 0xd2: case 0xca: take(4, 'a number'); break;
        case 0xcf: case 0xd3: case 0xcb: take(8, 'a number'); break;
        case 0xdc: open(uint(2, 'a count'), 'an array'); break;
        case 0xdd: open(uint(4, 'a count'), 'an array'); break;
        case 0xde: open(uint(2, 'a count') * 2, 'a map'); break;
        case 0xdf: open(uint(4, 'a count') * 2, 'a map'); break;
        default:
          // 0xc1 (never used) and every extension type (0xc7–0xc9, 0xd4–0xd8): not part of the protocol.
          throw malformed(`type byte 0x${b.toString(16)} at offset ${pos - 1} is not used by the protocol`);
      }
    }
  }
  if (pos !== end) throw malformed(`${end - pos} bytes follow the value`);
}
