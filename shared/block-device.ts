// Facts about a block device that Node's fs does not give (fstat reports size 0).
import { readFileSync, realpathSync } from 'node:fs';
import { basename } from 'node:path';

/** sysfs directory of a block device node: /sys/class/block/NAME. */
export function sysfsDir(devicePath: string): string {
  return `/sys/class/block/${basename(realpathSync(devicePath))}`;
}

export function blockDeviceSizeBytes(devicePath: string): number {
  return Number(readFileSync(`${sysfsDir(devicePath)}/size`, 'utf8').trim()) * 512;
}
