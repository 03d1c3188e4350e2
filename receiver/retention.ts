// Retention policy (DESIGN §7): which recovery points of a host to keep.
//
// Evaluated on the receiver's clock (the commit time it recorded), never on
// the agent's: an agent cannot age points out or make bogus ones look old.
// Bucket rules work like restic's: `hourly N` keeps the newest point in each
// of the N most recent hours that have points, and so on.
//
// Whatever the policy, the host's last point and the last point of each of
// its disks are kept: the latter is what the agent's next point builds on, and what
// a dropped point's versions of that disk fold into (receiver/prune.ts).
// "Last" is by id, the commit order, not by commit time, which moves back
// when the receiver's clock is stepped back.
import { z } from 'zod';
import { parseDurationMs } from '../shared/units.js';

export interface RetentionPolicy {
  keepWithinMs: number;
  keepHourly: number;
  keepDaily: number;
  keepWeekly: number;
}

export const DEFAULT_POLICY: RetentionPolicy = { keepWithinMs: 3_600_000, keepHourly: 24, keepDaily: 7, keepWeekly: 0 };

export interface RetainedPoint {
  id: number;
  /** Receiver's commit time. */
  committedMs: number;
  /** The disks the point lists (point_disk). */
  diskIds: number[];
}

export interface KeepDecision {
  keep: Map<number, string[]>;
  drop: number[];
}

const HOUR_MS = 3_600_000;
const DAY_MS = 86_400_000;
// 1970-01-01 was a Thursday; shift so that weeks start on Monday (UTC).
const WEEK_ORIGIN_MS = 4 * DAY_MS;

const bucketOf = {
  hourly: (ms: number) => Math.floor(ms / HOUR_MS),
  daily: (ms: number) => Math.floor(ms / DAY_MS),
  weekly: (ms: number) => Math.floor((ms - WEEK_ORIGIN_MS) / (7 * DAY_MS)),
};

/** Decides per point; `keep` maps each kept id to the rules that keep it (shown by prune --dry-run). */
export function decideRetention(points: RetainedPoint[], policy: RetentionPolicy, nowMs: number): KeepDecision {
  const newestFirst = [...points].sort((a, b) => b.committedMs - a.committedMs || b.id - a.id);
  const keep = new Map<number, string[]>();
  const mark = (id: number, reason: string) => keep.set(id, [...(keep.get(id) ?? []), reason]);
  const newest = points.reduce((max, p) => Math.max(max, p.id), 0);
  if (points.length > 0) mark(newest, 'newest');
  const lastOfDisk = new Map<number, number>();
  for (const p of points) for (const disk of p.diskIds) lastOfDisk.set(disk, Math.max(p.id, lastOfDisk.get(disk) ?? 0));
  for (const id of new Set(lastOfDisk.values())) if (id !== newest) mark(id, 'last of a disk');
  for (const p of newestFirst) if (nowMs - p.committedMs < policy.keepWithinMs) mark(p.id, 'within');
  for (const [rule, count] of [['hourly', policy.keepHourly], ['daily', policy.keepDaily], ['weekly', policy.keepWeekly]] as const) {
    let lastBucket: number | null = null;
    let kept = 0;
    for (const p of newestFirst) {
      if (kept >= count) break;
      const bucket = bucketOf[rule](p.committedMs);
      if (bucket === lastBucket) continue;
      lastBucket = bucket;
      kept++;
      mark(p.id, rule);
    }
  }
  const drop = points.filter((p) => !keep.has(p.id)).map((p) => p.id).sort((a, b) => a - b);
  return { keep, drop };
}

const policyFileSchema = z.object({
  keepWithin: z.string().optional(),
  keepHourly: z.number().int().min(0).optional(),
  keepDaily: z.number().int().min(0).optional(),
  keepWeekly: z.number().int().min(0).optional(),
});

export type PolicyOverrides = z.infer<typeof policyFileSchema>;

export function parsePolicyOverrides(value: unknown): PolicyOverrides {
  return policyFileSchema.parse(value ?? {});
}

/** Defaults, then the config file's `retention`, then command-line flags. */
export function resolvePolicy(...layers: PolicyOverrides[]): RetentionPolicy {
  const policy = { ...DEFAULT_POLICY };
  for (const layer of layers) {
    if (layer.keepWithin !== undefined) policy.keepWithinMs = parseDurationMs(layer.keepWithin);
    if (layer.keepHourly !== undefined) policy.keepHourly = layer.keepHourly;
    if (layer.keepDaily !== undefined) policy.keepDaily = layer.keepDaily;
    if (layer.keepWeekly !== undefined) policy.keepWeekly = layer.keepWeekly;
  }
  return policy;
}
