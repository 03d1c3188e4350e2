// A loop device with an ext4 filesystem mounted on it, for the continuous-mode
// part of the bench. Only what this object attached and mounted is undone.
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmdirSync } from 'node:fs';
import { attachLoop } from '../test/harness.js';

function sh(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as { status?: number; stderr?: string };
    throw new Error(`${cmd} ${args.join(' ')} failed (exit ${e.status}): ${(e.stderr ?? '').trim()}`);
  }
}

export class MountedLoop {
  private mounted = false;

  private constructor(readonly device: string, readonly mountPoint: string) {}

  static attach(image: string, mountPoint: string): MountedLoop {
    const device = attachLoop(image);
    const loop = new MountedLoop(device, mountPoint);
    try {
      mkdirSync(mountPoint, { recursive: true });
      sh('mount', ['-t', 'ext4', device, mountPoint]);
      loop.mounted = true;
    } catch (err) {
      loop.close();
      throw err;
    }
    return loop;
  }

  /** Unmounts and detaches; errors are reported but do not stop the rest of the cleanup. */
  close(): string[] {
    const problems: string[] = [];
    if (this.mounted) {
      try {
        sh('umount', [this.mountPoint]);
        this.mounted = false;
        rmdirSync(this.mountPoint);
      } catch (err) {
        problems.push((err as Error).message);
      }
    }
    try {
      sh('losetup', ['--detach', this.device]);
    } catch (err) {
      problems.push((err as Error).message);
    }
    return problems;
  }
}
