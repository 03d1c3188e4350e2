// Byte-level reads and writes of files under test (pack files, images), for
// tests that damage stored data on purpose and put it back.
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';

export function readAt(path: string, position: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    assert.equal(readSync(fd, buf, 0, length, position), length, `${path}: ${length} bytes at ${position}`);
    return buf;
  } finally {
    closeSync(fd);
  }
}

export function writeAt(path: string, position: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, position);
  } finally {
    closeSync(fd);
  }
}

/** Flips every bit of one byte; returns a function that puts it back. */
export function flipByte(path: string, position: number): () => void {
  const original = readAt(path, position, 1);
  writeAt(path, position, Buffer.from([original[0]! ^ 0xff]));
  return () => writeAt(path, position, original);
}
