// One bit per block: blocks written since they were last shipped.
import { closeSync, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import { writeFileDurable } from '../shared/fs-util.js';

export class DirtyMap {
  private constructor(readonly bits: Uint8Array) {}

  static empty(blockCount: number): DirtyMap {
    return new DirtyMap(new Uint8Array(Math.ceil(blockCount / 8)));
  }

  /** The persisted map, or null when there is none of this size (then nothing is known). */
  static load(path: string, blockCount: number): DirtyMap | null {
    if (!existsSync(path)) return null;
    const bytes = readFileSync(path);
    return bytes.length === Math.ceil(blockCount / 8) ? new DirtyMap(new Uint8Array(bytes)) : null;
  }

  mark(first: number, last: number, touched?: Set<number>): void {
    for (let b = first; b <= last; b++) {
      this.bits[b >> 3]! |= 1 << (b & 7);
      touched?.add(b >> 3);
    }
  }

  has(block: number): boolean {
    return (this.bits[block >> 3]! & (1 << (block & 7))) !== 0;
  }

  count(): number {
    let n = 0;
    for (const byte of this.bits) for (let v = byte; v; v &= v - 1) n++;
    return n;
  }

  or(other: DirtyMap): void {
    for (let i = 0; i < this.bits.length; i++) this.bits[i]! |= other.bits[i]!;
  }

  intersects(other: DirtyMap): boolean {
    for (let i = 0; i < this.bits.length; i++) if (this.bits[i]! & other.bits[i]!) return true;
    return false;
  }

  /** Runs of consecutive dirty blocks, [first, count], each at most `maxRun` long. */
  *runs(maxRun: number): Generator<[number, number]> {
    const total = this.bits.length * 8;
    for (let b = 0; b < total; ) {
      if (this.bits[b >> 3] === 0) {
        b = (b | 7) + 1;
        continue;
      }
      if (!this.has(b)) {
        b++;
        continue;
      }
      let n = 1;
      while (n < maxRun && b + n < total && this.has(b + n)) n++;
      yield [b, n];
      b += n;
    }
  }

  save(path: string): void {
    writeFileDurable(path, Buffer.from(this.bits.buffer, this.bits.byteOffset, this.bits.byteLength), 0o600);
  }

  /** Writes only the bytes that changed (no fsync: a reboot loses the tracefs instance anyway). */
  saveBytes(path: string, touched: Set<number>): void {
    if (touched.size === 0) return;
    if (!existsSync(path)) return this.save(path);
    const fd = openSync(path, 'r+');
    try {
      for (const i of touched) writeSync(fd, this.bits, i, 1, i);
    } finally {
      closeSync(fd);
    }
    touched.clear();
  }
}
