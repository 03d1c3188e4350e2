// All-zero blocks are recorded as zero, never stored (DESIGN §5).

let zeros = Buffer.alloc(64 * 1024);

/** True when every byte is zero; one memcmp against a shared zero buffer. */
export function isZeroBlock(buf: Buffer): boolean {
  if (buf.length > zeros.length) zeros = Buffer.alloc(buf.length);
  return buf.equals(zeros.subarray(0, buf.length));
}
