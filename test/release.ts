// An earlier release of Tidemark, built from this repository's history into a
// temp directory, so version-skew tests run its real CLIs beside this tree's.
import { execFileSync } from 'node:child_process';
import { rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT, tempDir } from './harness.js';

/** The last commit before protocol v1 gained chunks.get (and pack files v2): what operators may still run. */
export const RELEASE_BEFORE_CHUNKS_GET = 'ee92c6ebd5b1b763951c05d33b36a4e80c969240';

export interface Release {
  /** Pass as the root of harness CLIs (launcherPath, runCli, Deployment.start). */
  root: string;
  remove(): void;
}

/** Checks out `commit` with `git archive`, links this tree's node_modules, and compiles the CLIs (not its tests). */
export function buildRelease(commit: string): Release {
  const root = tempDir('tidemark-release-');
  try {
    execFileSync('sh', ['-c', 'git -C "$1" archive "$2" | tar -x -C "$3"', 'sh', REPO_ROOT, commit, root], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    rmSync(root, { recursive: true, force: true });
    throw new Error(`cannot check out release ${commit}: this test needs the repository's git history (${(err as Error).message.trim()})`);
  }
  symlinkSync(join(REPO_ROOT, 'node_modules'), join(root, 'node_modules'));
  writeFileSync(join(root, 'tsconfig.release.json'), JSON.stringify({
    extends: './tsconfig.json',
    include: ['shared', 'agent', 'receiver', 'restore'],
    compilerOptions: { sourceMap: false },
  }));
  execFileSync(process.execPath, [join(REPO_ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.release.json')], { stdio: ['ignore', 'pipe', 'pipe'] });
  return { root, remove: () => rmSync(root, { recursive: true, force: true }) };
}
