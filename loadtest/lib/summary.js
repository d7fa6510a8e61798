// The end-of-test report: the whole k6 summary as JSON in $SUMMARY_DIR/<scenario>.json
// (default loadtest/results/, relative to where k6 runs), and a short text report on stdout.

/** Trend statistics every scenario reports (p(99) is what the latency thresholds judge). */
export const TREND_STATS = ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'];

/** k6's own metrics; every other metric is a scenario's and is listed in full. */
const BUILTIN = new Set([
  'checks', 'data_received', 'data_sent', 'dropped_iterations', 'http_req_blocked',
  'http_req_connecting', 'http_req_duration', 'http_req_failed', 'http_req_receiving',
  'http_req_sending', 'http_req_tls_handshaking', 'http_req_waiting', 'http_reqs', 'group_duration',
  'iteration_duration', 'iterations', 'vus', 'vus_max',
]);

function ms(v) {
  return v === undefined ? '-' : `${v.toFixed(v < 10 ? 2 : 0)}ms`;
}

function metricLine(name, m) {
  const v = m.values;
  switch (m.type) {
    case 'counter':
      return `${name}: ${v.count}`;
    case 'rate':
      return `${name}: ${(v.rate * 100).toFixed(2)}% (${v.passes} of ${v.passes + v.fails})`;
    case 'gauge':
      return `${name}: ${v.value}`;
    default:
      return `${name}: med ${ms(v.med)} p95 ${ms(v['p(95)'])} p99 ${ms(v['p(99)'])} max ${ms(v.max)}`;
  }
}

function failedChecks(group, out) {
  (group.checks || []).forEach((c) => {
    if (c.fails > 0) out.push(`${c.name}: ${c.fails} failed, ${c.passes} passed`);
  });
  (group.groups || []).forEach((g) => failedChecks(g, out));
  return out;
}

/** The text report. */
export function textSummary(scenario, data) {
  const metrics = data.metrics;
  const lines = [];
  const thresholds = [];
  Object.keys(metrics).sort().forEach((name) => {
    Object.entries(metrics[name].thresholds || {}).forEach(([expr, t]) => {
      thresholds.push({ name, expr, ok: t.ok });
    });
  });
  const failed = thresholds.filter((t) => !t.ok);
  const seconds = (data.state.testRunDurationMs / 1000).toFixed(1);
  const verdict = failed.length === 0 ? 'PASS' : 'FAIL';
  lines.push(`== kamigate load test: ${scenario} — ${verdict} (${seconds} s)`);
  ['iterations', 'dropped_iterations', 'http_reqs'].forEach((name) => {
    if (metrics[name]) {
      const v = metrics[name].values;
      lines.push(`  ${name}: ${v.count} (${v.rate.toFixed(1)}/s)`);
    }
  });
  if (metrics.http_req_duration) {
    lines.push(`  ${metricLine('http_req_duration', metrics.http_req_duration)}`);
  }
  if (metrics.checks) lines.push(`  ${metricLine('checks', metrics.checks)}`);
  Object.keys(metrics).filter((n) => !BUILTIN.has(n) && !n.includes('{')).sort().forEach((name) => {
    lines.push(`  ${metricLine(name, metrics[name])}`);
  });
  lines.push('  thresholds:');
  thresholds.forEach((t) => lines.push(`    ${t.ok ? 'ok  ' : 'FAIL'} ${t.name}: ${t.expr}`));
  const checks = failedChecks(data.root_group || {}, []);
  if (checks.length > 0) {
    lines.push('  failed checks:');
    checks.forEach((c) => lines.push(`    ${c}`));
  }
  return lines.join('\n') + '\n';
}

/** A `handleSummary` for `scenario`. */
export function summaryHandler(scenario) {
  return function handleSummary(data) {
    const dir = (__ENV.SUMMARY_DIR || 'loadtest/results').replace(/\/+$/, '');
    return {
      [`${dir}/${scenario}.json`]: JSON.stringify(data, null, 2),
      stdout: textSummary(scenario, data),
    };
  };
}
