// tidemark-agent: enroll, scan, run, status (CLI contract: DESIGN §9, README).
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { z } from 'zod';
import { Command, Option } from 'commander';
import { VaultKeys } from '../shared/chunk-crypto.js';
import { TidemarkError, asTidemarkError, settingsProblem } from '../shared/errors.js';
import { openKeyFile } from '../shared/keyfile.js';
import { createLogger } from '../shared/log.js';
import { MAX_BLOCK_BYTES, MIN_BLOCK_BYTES } from '../shared/protocol.js';
import { passphraseFileOption, printJson, printable, readPassphrase, readToken, runCli } from '../shared/cli-util.js';
import { formatBytes, parseDurationMs, parseSizeBytes } from '../shared/units.js';
import { describeDisks, scanBlockDevices } from './disks.js';
import { KEY_BACKUP_WARNING, enroll } from './enroll.js';
import { registerKeyCommand } from './key.js';
import { AgentState } from './state.js';
import { replicate, type PointEvent } from './replicator.js';
import { syncOnce } from './sync.js';

const program = new Command('tidemark-agent').description('Tidemark agent: replicates this host\'s disks to a receiver');

program.command('enroll')
  .description('enroll this host with a receiver using a one-time token; creates the key file if absent')
  .requiredOption('--state <dir>', 'agent state directory')
  .requiredOption('--receiver <url>', 'receiver address, wss://HOST:PORT')
  .requiredOption('--fingerprint <fp>', 'receiver TLS certificate fingerprint (from tidemark-receiver init)')
  .option('--token <token>', 'one-time enrollment token (visible in ps: prefer TIDEMARK_TOKEN or --token-file)')
  .option('--token-file <file>', 'file holding the one-time enrollment token')
  .requiredOption('--key-file <file>', 'vault key file (created if absent; passphrase from TIDEMARK_PASSPHRASE)')
  .option('--host <name>', 'name of this host on the receiver (default: hostname)')
  .addOption(passphraseFileOption())
  .option('--json', 'print the result as JSON')
  .action(async (opts: { state: string; receiver: string; fingerprint: string; token?: string; tokenFile?: string; keyFile: string; host?: string; passphraseFile?: string; json?: boolean }) => {
    const result = await enroll({
      stateDir: opts.state, receiverUrl: opts.receiver, fingerprint: opts.fingerprint, token: readToken(opts.token, opts.tokenFile),
      keyFile: opts.keyFile, host: opts.host, passphrase: readPassphrase(opts.passphraseFile),
    });
    if (result.keyCreated) process.stderr.write(KEY_BACKUP_WARNING(opts.keyFile));
    if (opts.json) return printJson(result);
    process.stdout.write(`Enrolled host ${result.host} (vault ${result.vaultId}) with ${opts.receiver}\n`);
  });

registerKeyCommand(program);

program.command('scan')
  .description('list disks with size, sector size and bytes holding data')
  .argument('[paths...]', 'disks or image files (default: every block device in /sys/block)')
  .option('--json', 'print one JSON document')
  .action(async (paths: string[], opts: { json?: boolean }) => {
    const { disks, skipped } = paths.length > 0 ? { disks: await describeDisks(paths), skipped: [] } : await scanBlockDevices();
    if (opts.json) return printJson({ disks, skipped });
    for (const s of skipped) process.stderr.write(`tidemark-agent: skipped ${s.path}: ${s.reason}\n`);
    for (const d of disks) {
      process.stdout.write(`${d.path}\t${d.kind}\t${formatBytes(d.sizeBytes)}\tsector ${d.sectorBytes}\tdata ${formatBytes(d.dataBytes)}\n`);
    }
  });

program.command('run')
  .description('replicate the disks: continuously, or one cycle with --once')
  .option('--config <file>', 'JSON settings {state, disks, interval, blockSize, bwlimit, tracker, snapshot}; flags override them')
  .option('--state <dir>', 'agent state directory')
  .option('--disk <path>', 'disk or image file to protect (repeatable)', (v: string, all: string[] = []) => [...all, v])
  .option('--interval <duration>', 'time between recovery points (default 10s)')
  .option('--block-size <size>', 'block size for disks synced the first time, a power of two from 4K to 1M (default 64K)')
  .option('--bwlimit <size>', 'cap on bytes sent per second, e.g. 20M (default: unlimited)')
  .addOption(new Option('--tracker <kind>', 'change tracking (default auto: tracefs for block devices when available)').choices(['auto', 'tracefs', 'scan']))
  .addOption(new Option('--snapshot <mode>', 'hash scans of image files read a reflink clone (XFS, Btrfs) when the filesystem can make one (default auto)').choices(['auto', 'off']))
  .option('--once', 'one sync cycle (initial or incremental), commit one point, exit')
  .addOption(passphraseFileOption())
  .option('--json', 'progress and each point as JSON lines on stdout')
  .action(async (flags: RunFlags) => {
    const opts = withConfig(flags);
    const blockBytes = parseSizeBytes(opts.blockSize);
    if (blockBytes < MIN_BLOCK_BYTES || blockBytes > MAX_BLOCK_BYTES || (blockBytes & (blockBytes - 1)) !== 0) {
      throw new TidemarkError('E_USAGE', `--block-size must be a power of two from 4K to 1M (got ${opts.blockSize})`);
    }
    const intervalMs = parseDurationMs(opts.interval);
    if (intervalMs < 1000) throw new TidemarkError('E_USAGE', '--interval must be at least 1s');
    const state = AgentState.open(opts.state, { mustBeEnrolled: true });
    const log = createLogger('tidemark-agent', flags.once ? 'warn' : 'info');
    try {
      const keys = VaultKeys.fromMaster(openKeyFile(state.enrollment()!.keyFile, readPassphrase(flags.passphraseFile)));
      const common = {
        state, keys, diskPaths: opts.disks, blockBytes, bytesPerSecond: opts.bwlimit ? parseSizeBytes(opts.bwlimit) : 0, snapshot: opts.snapshot, json: !!flags.json, log,
      };
      if (flags.once) {
        state.saveStatus({ tracker: 'scan', reason: 'run --once compares block hashes' });
        const result = await syncOnce(common);
        reportResult({ ...result, tracker: 'scan', mode: result.initial ? 'initial' : 'incremental' }, !!flags.json);
        if (result.crashConsistent) state.saveStatus({ reason: 'run --once finished; changes are not replicated until the next run' });
        return;
      }
      await replicate({ ...common, intervalMs, tracker: opts.tracker }, (point) => reportResult(point, !!flags.json));
      // Stopped by SIGTERM/SIGINT (systemctl stop): status must not go on saying all is well.
      state.saveStatus({ reason: 'the agent was stopped; changes are not replicated until it runs again' });
    } catch (err) {
      const error = asTidemarkError(err, { stateDir: state.dir });
      saveErrorStatus(state, error.message);
      throw error;
    } finally {
      state.close();
    }
  });

/** Best effort: when the state directory is what failed (full), its error is what the operator must see. */
function saveErrorStatus(state: AgentState, reason: string): void {
  try {
    state.saveStatus({ state: 'Error', reason });
  } catch {
    // status keeps its last state; the error is printed and exits
  }
}

interface RunFlags {
  config?: string; state?: string; disk?: string[]; interval?: string; blockSize?: string; bwlimit?: string;
  tracker?: 'auto' | 'tracefs' | 'scan'; snapshot?: 'auto' | 'off'; once?: boolean; passphraseFile?: string; json?: boolean;
}

const runConfigSchema = z.object({
  state: z.string().optional(),
  disks: z.array(z.string()).optional(),
  interval: z.string().optional(),
  blockSize: z.string().optional(),
  bwlimit: z.string().optional(),
  tracker: z.enum(['auto', 'tracefs', 'scan']).optional(),
  snapshot: z.enum(['auto', 'off']).optional(),
}).strict();

/**
 * One disk named twice (disk.img and ./disk.img, or /dev/sdb and a /dev/disk/by-id link to
 * it) would be read and shipped twice, and the receiver refuses the point only at its commit.
 */
function refuseRepeatedDisks(disks: string[]): void {
  const seen = new Map<string, string>();
  for (const disk of disks) {
    const real = existsSync(disk) ? realpathSync(disk) : disk; // a missing disk fails later, with E_DISK
    const earlier = seen.get(real);
    if (earlier !== undefined) {
      throw new TidemarkError('E_USAGE', earlier === disk ? `--disk ${disk} is given twice: name each disk once` : `--disk ${earlier} and --disk ${disk} are the same disk (${real}): name it once`);
    }
    seen.set(real, disk);
  }
}

/** Flags over the --config file over defaults. Disks are named by absolute path: `disk.img` and `./disk.img` are one disk. */
function withConfig(flags: RunFlags) {
  let config: z.infer<typeof runConfigSchema> = {};
  if (flags.config) {
    try {
      config = runConfigSchema.parse(JSON.parse(readFileSync(flags.config, 'utf8')));
    } catch (err) {
      throw new TidemarkError('E_USAGE', `invalid --config ${flags.config}: ${settingsProblem(err)}; see deploy/agent.example.json`);
    }
  }
  const state = flags.state ?? config.state;
  const disks = (flags.disk ?? config.disks ?? []).map((p) => resolve(p));
  if (!state) throw new TidemarkError('E_USAGE', 'no state directory: pass --state DIR (or "state" in --config)');
  if (disks.length === 0) throw new TidemarkError('E_USAGE', 'no disk given: pass --disk PATH (repeatable) or "disks" in --config');
  refuseRepeatedDisks(disks);
  return {
    state, disks,
    interval: flags.interval ?? config.interval ?? '10s',
    blockSize: flags.blockSize ?? config.blockSize ?? '64K',
    bwlimit: flags.bwlimit ?? config.bwlimit,
    tracker: flags.tracker ?? config.tracker ?? 'auto',
    snapshot: flags.snapshot ?? config.snapshot ?? 'auto',
  };
}

function reportResult(result: PointEvent, json: boolean): void {
  if (json) return void process.stdout.write(JSON.stringify({ event: 'point', ...result }) + '\n');
  process.stdout.write(
    `point ${result.pointId} at ${result.time}${result.crashConsistent ? '' : ' (NOT crash-consistent)'} [${result.tracker}, ${result.mode}${result.snapshot ? ', reflink snapshot' : ''}]: ` +
    `read ${formatBytes(result.bytesRead ?? 0)}, ${result.blocksChanged ?? 0} blocks changed, ` +
    `uploaded ${result.chunksUploaded ?? 0} chunks (${formatBytes(result.bytesUploaded ?? 0)}), ${result.chunksDeduplicated ?? 0} already stored, ` +
    `${((result.durationMs ?? 0) / 1000).toFixed(1)} s\n`,
  );
}

program.command('status')
  .description('state, lag, last point and disks of this agent')
  .requiredOption('--state <dir>', 'agent state directory')
  .option('--json', 'print one JSON document')
  .action((opts: { state: string; json?: boolean }) => {
    const state = AgentState.open(opts.state, { mustBeEnrolled: true });
    try {
      const enrollment = state.enrollment()!;
      const s = state.status();
      const doc = {
        host: enrollment.host,
        receiver: enrollment.receiverUrl,
        state: s.state,
        reason: s.reason,
        tracker: s.tracker,
        lagSeconds: s.lastPointTimeMs === null ? null : Math.max(0, (Date.now() - s.lastPointTimeMs) / 1000),
        backlogBytes: s.backlogBytes,
        lastPoint: s.lastPointId === null ? null : { id: s.lastPointId, time: new Date(s.lastPointTimeMs!).toISOString(), crashConsistent: s.lastPointConsistent },
        progress: s.progress,
        updatedAt: new Date(s.updatedMs).toISOString(),
        disks: state.disks().map((d) => ({ name: d.path, diskId: d.diskId, sizeBytes: d.sizeBytes, blockBytes: d.blockBytes, synced: d.hasBaseline })),
      };
      if (opts.json) return printJson(doc);
      process.stdout.write(`host ${doc.host} → ${doc.receiver}\nstate ${doc.state}${doc.reason ? ` (${printable(doc.reason)})` : ''}, tracker ${doc.tracker}\n`);
      process.stdout.write(doc.lastPoint ? `last point ${doc.lastPoint.id} at ${doc.lastPoint.time}, lag ${Math.round(doc.lagSeconds!)} s\n` : 'no point yet\n');
      for (const d of doc.disks) process.stdout.write(`  ${d.name}: ${formatBytes(d.sizeBytes)}, ${d.blockBytes / 1024} KiB blocks${d.synced ? '' : ', initial sync not finished'}\n`);
    } finally {
      state.close();
    }
  });

await runCli(program);
