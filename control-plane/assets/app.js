// The Meshwork dashboard: renders the state mesh-control pushes on
// /v1/events (Server-Sent Events), live, without a reload.
//
// Everything shown comes from the mesh (node and service names, tags,
// check outputs, authors, diffs), so the page is built with DOM calls and
// text nodes only: no HTML is ever parsed from data. Links are in-page
// (#/...) and built from encoded names.
'use strict';

(function () {
  // --- state ---------------------------------------------------------------

  /** The newest snapshot received (see dashboard::state::Snapshot). */
  let snapshot = null;
  /** Diffs of versions by "node\nnumber": versions never change once stored. */
  const diffs = new Map();

  // --- DOM helpers: text only ----------------------------------------------

  /**
   * An element with attributes and children. Children are nodes, or values
   * shown as text; arrays are flattened; null and undefined are skipped.
   * Event-handler attributes are refused, and href must stay in the page.
   */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (/^on/i.test(name)) throw new Error('event handler attributes are not allowed: ' + name);
      if (name === 'href' && !String(value).startsWith('#')) throw new Error('only in-page links: ' + value);
      if (name === 'class') node.className = String(value);
      else node.setAttribute(name, String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
  }

  function badge(word, kind) {
    return el('span', { class: 'badge ' + String(kind || word).replace(/[^a-z-]/g, '') }, word);
  }

  function table(headers, rows) {
    return el('table', {},
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', {}, h)))),
      el('tbody', {}, rows));
  }

  function facts(pairs) {
    return el('dl', { class: 'facts' },
      pairs.filter((p) => p).map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  }

  function nodeHref(name) {
    return '#/nodes/' + encodeURIComponent(name);
  }

  function versionHref(name, number) {
    return nodeHref(name) + '/versions/' + encodeURIComponent(number);
  }

  /** "2026-05-01T12:00:00.250Z" as "2026-05-01 12:00:00 UTC"; empty: `none`. */
  function when(iso, none) {
    if (!iso) return none;
    return String(iso).replace('T', ' ').replace(/(\.\d+)?Z$/, ' UTC');
  }

  // --- routing ---------------------------------------------------------------

  /** The page the hash names: {page, node?, version?}. */
  function route() {
    const parts = location.hash.replace(/^#\/?/, '').split('/').map((p) => {
      try { return decodeURIComponent(p); } catch (e) { return p; }
    });
    if (parts[0] === 'nodes' && parts[1]) {
      const version = parts[2] === 'versions' && /^\d+$/.test(parts[3] || '') ? Number(parts[3]) : null;
      return { page: 'node', node: parts[1], version };
    }
    if (['services', 'rollouts', 'deployments', 'alerts', 'intentions'].includes(parts[0])) return { page: parts[0] };
    return { page: 'nodes' };
  }

  // --- pages -----------------------------------------------------------------

  function nodesPage(s) {
    const rows = s.nodes.map((n) => el('tr', {},
      el('td', {}, el('a', { href: nodeHref(n.name) }, n.name)),
      el('td', {}, n.address),
      el('td', {}, n.datacenter),
      el('td', {}, badge(n.agent)),
      el('td', { title: refusal(n) || null }, badge(n.proxy.state)),
      el('td', { class: 'num' }, n.routes_version ? n.routes_version : 'none'),
      el('td', { class: 'num' }, inEffect(n)),
      el('td', {}, when(n.proxy.last_seen, 'never')),
      el('td', { class: 'num' }, n.instances)));
    return [
      el('h1', {}, 'Nodes ', el('span', { class: 'count' }, '(' + s.nodes.length + ')')),
      rolloutBanner(s),
      s.nodes.length
        ? table(['Node', 'Address', 'Datacenter', 'Agent', 'Proxy', 'Config version',
          'In effect', 'Last seen', 'Instances'], rows)
        : el('p', { class: 'empty' }, 'No nodes in Consul\'s catalog.'),
    ];
  }

  /** The version a node's proxy runs, and whether it is the newest. */
  function inEffect(n) {
    const v = n.proxy.version_in_effect;
    if (!v) return 'unknown';
    if (n.routes_version && v < n.routes_version) return [String(v) + ' ', badge('behind')];
    return String(v);
  }

  /** Which version the node's proxy refused and why; empty when none. */
  function refusal(n) {
    if (!n.proxy.refused_version) return '';
    return 'version ' + n.proxy.refused_version + ' refused' + (n.proxy.reason ? ': ' + n.proxy.reason : '');
  }

  function nodePage(s, name, selected) {
    const n = s.nodes.find((x) => x.name === name);
    const history = s.routes[name];
    const crumbs = el('div', { class: 'crumbs' }, el('a', { href: '#/nodes' }, 'Nodes'), ' / ', name);
    if (!n) {
      return [crumbs, el('h1', {}, 'Node ' + name),
        el('p', { class: 'empty' }, 'Node ' + name + ' is not in Consul\'s catalog.')];
    }
    const rolling = nodeInRollout(s, name);
    return [
      crumbs,
      el('h1', {}, 'Node ' + name),
      facts([
        ['Address', n.address],
        ['Datacenter', n.datacenter],
        ['Agent', badge(n.agent)],
        ['Proxy', badge(n.proxy.state)],
        ['Config version', n.routes_version ? String(n.routes_version) : 'none'],
        ['Version in effect', inEffect(n)],
        n.proxy.refused_version ? ['Refused', refusal(n)] : null,
        ['Last seen', when(n.proxy.last_seen, 'never')],
        ['Instances', String(n.instances)],
        nodeAlerts(s, name).length ? ['Alerts', alertsSummary(nodeAlerts(s, name))] : null,
        rolling ? ['Rollout', [
          el('a', { href: '#/rollouts' }, 'version ' + rolling[0].version), ' (', rolloutBadge(rolling[0].state),
          '): step ' + rolling[1].step + ', ', badge(rolling[1].state, 'step-' + rolling[1].state),
          rolling[1].detail ? ' ' + rolling[1].detail : '']] : null,
      ]),
      routesSection(history),
      history ? versionsSection(name, history, selected || history.version) : null,
    ];
  }

  function routesSection(history) {
    if (!history) {
      return [el('h2', {}, 'Routes'),
        el('p', { class: 'empty' }, 'No routes yet: this node\'s proxy runs with the defaults.')];
    }
    const names = Object.keys(history.routes).sort();
    const rows = names.map((svc) => {
      const r = history.routes[svc];
      const weights = Object.entries(r.weights || {}).map(([k, w]) => el('span', { class: 'tag' }, k + '=' + w));
      const hash = r.hash_header ? 'header ' + r.hash_header : r.hash_cookie ? 'cookie ' + r.hash_cookie : '';
      return el('tr', {},
        el('td', {}, svc),
        el('td', {}, r.timeout || 'default'),
        el('td', {}, r.per_try_timeout || 'default'),
        el('td', { class: 'num' }, r.retries === undefined ? 'default' : r.retries),
        el('td', {}, r.lb || 'default'),
        el('td', {}, weights.length ? weights : ''),
        el('td', {}, hash));
    });
    return [
      el('h2', {}, 'Routes ', el('span', { class: 'count' },
        '\u2014 version ' + history.version + ', revision ' + history.revision)),
      names.length
        ? table(['Service', 'Timeout', 'Per-try timeout', 'Retries', 'Load balancing', 'Weights', 'Hash on'], rows)
        : el('p', { class: 'empty' }, 'Version ' + history.version + ' has no routes.'),
    ];
  }

  function versionsSection(name, history, selected) {
    const rows = history.versions.map((v) => el('tr', { class: v.number === selected ? 'selected' : null },
      el('td', { class: 'num' }, el('a', { href: versionHref(name, v.number) }, 'version ' + v.number)),
      el('td', {}, v.current ? badge('current') : v.number > history.version ? badge('staged', 'pending') : ''),
      el('td', {}, v.author),
      el('td', {}, when(v.created_at, '')),
      el('td', { class: 'num' }, v.routes)));
    const shown = history.versions.length < history.versions_total
      ? 'newest ' + history.versions.length + ' of ' + history.versions_total
      : String(history.versions_total);
    return [
      el('h2', {}, 'Versions ', el('span', { class: 'count' }, '(' + shown + ')')),
      table(['Version', 'State', 'Author', 'Created', 'Routes'], rows),
      el('h2', {}, 'Diff of version ' + selected,
        el('span', { class: 'count' }, selected > 1 ? ' against version ' + (selected - 1) : '')),
      diffView(name, selected),
    ];
  }

  function diffView(name, number) {
    const entry = loadDiff(name, number);
    if (entry.status === 'loading') return el('p', { class: 'empty' }, 'Loading the diff\u2026');
    if (entry.status === 'error') return el('p', { class: 'empty' }, 'The diff could not be read: ' + entry.error);
    if (!entry.diff) return el('p', { class: 'empty' }, 'No change against the previous version.');
    const lines = entry.diff.replace(/\n$/, '').split('\n');
    return el('pre', { class: 'diff' }, lines.map((line) => el('span', { class: diffClass(line) }, line)));
  }

  function diffClass(line) {
    if (line.startsWith('+++') || line.startsWith('---')) return 'meta';
    if (line.startsWith('@@')) return 'hunk';
    if (line.startsWith('+')) return 'add';
    if (line.startsWith('-')) return 'del';
    return 'ctx';
  }

  /** A version's diff from the REST API, fetched once and kept. */
  function loadDiff(name, number) {
    const key = name + '\n' + number;
    let entry = diffs.get(key);
    if (entry) return entry;
    entry = { status: 'loading' };
    diffs.set(key, entry);
    fetch('/v1/nodes/' + encodeURIComponent(name) + '/versions/' + encodeURIComponent(number),
      { headers: { accept: 'application/json' }, cache: 'no-store' })
      .then((r) => r.json().then((body) => {
        if (!r.ok) throw new Error(body.error || ('HTTP ' + r.status));
        return body;
      }))
      .then((v) => { entry.status = 'ok'; entry.diff = v.diff; })
      .catch((e) => { entry.status = 'error'; entry.error = String((e && e.message) || e); })
      .then(render);
    return entry;
  }

  function servicesPage(s) {
    const sections = s.services.map((svc) => {
      const passing = svc.instances.filter((i) => i.health === 'passing').length;
      const rows = svc.instances.map((i) => el('tr', {},
        el('td', {}, i.id),
        el('td', {}, el('a', { href: nodeHref(i.node) }, i.node)),
        el('td', {}, i.address + ':' + i.port),
        el('td', {}, tags(i.tags), meta(i.meta)),
        el('td', {}, badge(i.health)),
        el('td', {}, el('ul', { class: 'checks' }, i.checks.map((c) =>
          el('li', { title: c.output || null }, c.id + ': ', badge(c.status)))))));
      return el('section', { class: 'service' },
        el('h2', {}, svc.name),
        el('p', { class: 'summary' },
          svc.instances.length + (svc.instances.length === 1 ? ' instance, ' : ' instances, ') + passing + ' passing',
          svc.tags.length ? ' \u00b7 tags ' : '', tags(svc.tags)),
        svc.instances.length
          ? table(['Instance', 'Node', 'Address', 'Tags and meta', 'Health', 'Checks'], rows)
          : el('p', { class: 'empty' }, 'No instances.'));
    });
    return [
      el('h1', {}, 'Services ', el('span', { class: 'count' }, '(' + s.services.length + ')')),
      sections.length ? sections : el('p', { class: 'empty' }, 'No services in Consul\'s catalog.'),
    ];
  }

  function tags(list) {
    return (list || []).map((t) => el('span', { class: 'tag' }, t));
  }

  function meta(map) {
    return Object.entries(map || {}).map(([k, v]) => el('span', { class: 'tag' }, k + '=' + v));
  }

  /** Rollout states in which a rollout may still move nodes. */
  const UNDER_WAY = ['running', 'paused', 'aborting'];

  /** The rollout under way, if any (the snapshot lists it first). */
  function activeRollout(s) {
    return (s.rollouts || []).find((ro) => UNDER_WAY.includes(ro.state)) || null;
  }

  function rolloutBadge(state) {
    return badge(state, 'rollout-' + state);
  }

  /** "step k of n": the step under way, the last one once all are done. */
  function stepText(ro) {
    return 'step ' + Math.min(ro.step, ro.steps) + ' of ' + ro.steps;
  }

  function progressText(ro) {
    return ro.done + '/' + ro.nodes.length + ' nodes, ' + stepText(ro);
  }

  /** 30000 as "30 s", 120000 as "2 min", 1500 as "1500 ms". */
  function duration(ms) {
    if (ms >= 60000 && ms % 60000 === 0) return ms / 60000 + ' min';
    if (ms >= 1000 && ms % 1000 === 0) return ms / 1000 + ' s';
    return ms + ' ms';
  }

  function plural(n, one, many) {
    return n + ' ' + (n === 1 ? one : many);
  }

  /** A line on the nodes page while a rollout is under way. */
  function rolloutBanner(s) {
    const ro = activeRollout(s);
    if (!ro) return null;
    return el('p', { class: 'rollout-banner' },
      el('a', { href: '#/rollouts' }, 'Rollout of version ' + ro.version), ': ',
      rolloutBadge(ro.state), ' ' + stepText(ro) + ', ' + ro.done + '/' + ro.nodes.length + ' nodes done',
      ro.reason ? ' \u2014 ' + ro.reason : '');
  }

  /** Where `name` is in the rollout under way: [rollout, its node], or null. */
  function nodeInRollout(s, name) {
    const ro = activeRollout(s);
    const rn = ro && ro.nodes.find((x) => x.node === name);
    return rn ? [ro, rn] : null;
  }

  function rolloutsPage(s) {
    const rollouts = s.rollouts || [];
    if (!rollouts.length) {
      return [
        el('h1', {}, 'Rollouts'),
        el('p', { class: 'empty' }, 'No rollouts yet.'),
        el('p', { class: 'empty' },
          'A rollout brings a config version to the nodes step by step (a canary first, then batches, ' +
          'each gated on health); it shows here as it runs.'),
      ];
    }
    const total = s.rollouts_total || rollouts.length;
    const shown = rollouts.length < total ? 'newest ' + rollouts.length + ' of ' + total : String(total);
    return [
      el('h1', {}, 'Rollouts ', el('span', { class: 'count' }, '(' + shown + ')')),
      rollouts.map(rolloutSection),
    ];
  }

  function rolloutSection(ro) {
    const options = 'canary ' + plural(ro.canary, 'node', 'nodes') + ', then ' +
      plural(ro.batch, 'node', 'nodes') + ' a step \u00b7 soak ' + duration(ro.soak_ms) +
      ' \u00b7 acknowledgement within ' + duration(ro.ack_timeout_ms);
    return el('section', { class: 'rollout' },
      el('h2', {}, 'Rollout of version ' + ro.version + ' ', rolloutBadge(ro.state)),
      el('p', { class: 'summary' },
        'by ' + ro.author + ' \u00b7 started ' + when(ro.created_at, 'unknown') +
        ' \u00b7 updated ' + when(ro.updated_at, 'unknown') + (ro.driver ? ' \u00b7 driven by ' + ro.driver : '')),
      el('p', { class: 'progress' },
        el('progress', { max: ro.nodes.length || 1, value: ro.done }), ' ', progressText(ro)),
      ro.reason ? el('p', { class: 'reason ' + ro.state.replace(/[^a-z]/g, '') }, ro.reason) : null,
      el('p', { class: 'summary' }, options),
      rolloutNodes(ro),
      rolloutHistory(ro));
  }

  function rolloutNodes(ro) {
    const current = UNDER_WAY.includes(ro.state) ? ro.step : 0;
    const rows = ro.nodes.map((rn) => el('tr', { class: rn.step === current ? 'current' : null },
      el('td', { class: 'num' }, rn.step),
      el('td', {}, el('a', { href: nodeHref(rn.node) }, rn.node)),
      el('td', { class: 'num' },
        rn.from ? el('a', { href: versionHref(rn.node, rn.from) }, String(rn.from)) : 'none',
        ' \u2192 ', el('a', { href: versionHref(rn.node, ro.version), title: 'version ' + ro.version + ' of ' + rn.node + ' and its diff' },
          String(ro.version))),
      el('td', {}, badge(rn.state, 'step-' + rn.state)),
      el('td', {}, rn.detail),
      el('td', {}, when(rn.pushed_at, '')),
      el('td', {}, when(rn.acked_at, ''))));
    return table(['Step', 'Node', 'Version', 'State', 'Detail', 'Pushed', 'Acknowledged'], rows);
  }

  /** What happened, oldest first, as the API keeps it. */
  function rolloutHistory(ro) {
    return history(ro.events);
  }

  function history(events) {
    if (!events.length) return null;
    return [
      el('h3', {}, 'History ', el('span', { class: 'count' }, '(oldest first)')),
      el('table', { class: 'events' }, el('tbody', {}, events.map((ev) => el('tr', {},
        el('td', { class: 'at' }, when(ev.at, '')),
        el('td', {}, ev.text))))),
    ];
  }

  // --- deployments -------------------------------------------------------------

  function deploymentBadge(state) {
    return badge(state, 'deployment-' + state);
  }

  /** 1536 as "1.5 KiB". */
  function bytes(n) {
    const units = ['bytes', 'KiB', 'MiB', 'GiB'];
    let v = n;
    let u = 0;
    while (v >= 1024 && u < units.length - 1) { v /= 1024; u += 1; }
    return (u === 0 ? String(v) : v.toFixed(1)) + ' ' + units[u];
  }

  /** The first 12 hex digits of a SHA-256, the whole one as its title. */
  function shortSha(sha) {
    return el('code', { title: 'SHA-256 ' + sha }, String(sha).slice(0, 12));
  }

  function deploymentsPage(s) {
    const deployments = s.deployments || [];
    if (!deployments.length) {
      return [
        el('h1', {}, 'Deployments'),
        el('p', { class: 'empty' }, 'No deployments yet.'),
        el('p', { class: 'empty' },
          'A deployment brings an artifact (a jar) to the nodes\' deployers one node at a time ' +
          '(blue-green on each, gated on health, then a soak); it shows here as it runs, with ' +
          'the version each node runs.'),
      ];
    }
    const total = s.deployments_total || deployments.length;
    const shown = deployments.length < total ? 'newest ' + deployments.length + ' of ' + total : String(total);
    return [
      el('h1', {}, 'Deployments ', el('span', { class: 'count' }, '(' + shown + ')')),
      deployersSection(s.deployers || [], deployments),
      deployments.map(deploymentSection),
    ];
  }

  /**
   * What each node runs now, and the versions it keeps to roll back to. A
   * node whose deployer did not answer gets a row when a deployment shown
   * takes it; the others (a Consul server, a node that runs no deployer)
   * are named in one line below.
   */
  function deployersSection(deployers, deployments) {
    const taken = new Set(deployments.flatMap((d) => d.nodes.map((dn) => dn.node)));
    const silent = deployers.filter((nd) => nd.error && !taken.has(nd.node));
    const rows = [];
    for (const nd of deployers.filter((x) => !silent.includes(x))) {
      const node = el('a', { href: nodeHref(nd.node), title: 'deployer ' + nd.deployer }, nd.node);
      if (nd.error) {
        rows.push(el('tr', { class: 'unreachable' }, el('td', {}, node),
          el('td', { colspan: 8 }, badge('unreachable', 'failed'), ' ', nd.error)));
        continue;
      }
      const services = new Set(nd.instances.map((di) => di.service).concat(nd.artifacts.map((da) => da.service)));
      if (!services.size) {
        rows.push(el('tr', {}, el('td', {}, node), el('td', { colspan: 8, class: 'empty' }, 'runs and keeps nothing')));
        continue;
      }
      for (const service of [...services].sort()) {
        const kept = nd.artifacts.filter((da) => da.service === service).map((da) => el('span', {
          class: 'kept',
          title: da.file_name + ', ' + bytes(da.size) + ', SHA-256 ' + da.sha256 + ', stored ' + when(da.stored_at, 'unknown'),
        }, da.version));
        const running = nd.instances.filter((di) => di.service === service);
        const first = running.length ? running : [null];
        first.forEach((di, k) => rows.push(el('tr', {},
          el('td', {}, k === 0 ? node : null),
          el('td', {}, k === 0 ? service : null),
          el('td', {}, di ? di.version : 'none'),
          el('td', {}, di ? badge(di.state) : null),
          el('td', {}, di ? di.instance_id : null),
          el('td', { class: 'num' }, di ? di.port : null),
          el('td', { class: 'num' }, di && di.pid ? di.pid : null),
          el('td', { class: 'num' }, di ? di.restarts : null),
          el('td', {}, k === 0 ? kept.map((x, i) => [i ? ' ' : null, x]) : null))));
      }
    }
    if (!rows.length && !silent.length) return null;
    return el('section', { class: 'deployers' },
      el('h2', {}, 'Running now'),
      rows.length ? table(['Node', 'Service', 'Version', 'State', 'Instance', 'Port', 'PID', 'Restarts', 'Versions kept'], rows) : null,
      silent.length ? el('p', { class: 'summary', title: silent.map((nd) => nd.node + ': ' + nd.error).join('\n') },
        'No deployer answers on ' + silent.map((nd) => nd.node).join(', ') + '.') : null);
  }

  function deploymentSection(d) {
    const done = d.nodes.filter((dn) => dn.state === 'done').length;
    const settings = 'health ' + (d.health_path || '/health') + ' within ' + duration(d.health_timeout_ms) +
      ' \u00b7 drain ' + duration(d.drain_ms) + ' \u00b7 soak ' + duration(d.soak_ms) + ' \u00b7 ' + d.strategy;
    return el('section', { class: 'rollout deployment' },
      el('h2', {}, 'Deployment ' + d.id + ': ' + d.service + ' ' + d.version + ' ', deploymentBadge(d.state)),
      el('p', { class: 'summary' },
        'by ' + d.author + ' \u00b7 started ' + when(d.created_at, 'unknown') +
        ' \u00b7 updated ' + when(d.updated_at, 'unknown') + (d.driver ? ' \u00b7 driven by ' + d.driver : '')),
      el('p', { class: 'progress' },
        el('progress', { max: d.nodes.length || 1, value: done }), ' ', done + '/' + d.nodes.length + ' nodes done'),
      d.reason ? el('p', { class: 'reason ' + d.state.replace(/[^a-z]/g, '') }, d.reason) : null,
      el('p', { class: 'summary' },
        d.file_name + ' \u00b7 ' + bytes(d.size) + ' \u00b7 SHA-256 ', shortSha(d.sha256)),
      el('p', { class: 'summary' }, 'runs ', el('code', {}, d.command), ' \u00b7 ' + settings),
      deploymentNodes(d),
      history(d.events));
  }

  /** "v1 → v2"; a node not reached yet shows only where it goes (what it runs was not asked). */
  function versionChange(dn, version) {
    if (dn.from_version) return dn.from_version + ' \u2192 ' + version;
    if (['pending', 'skipped'].includes(dn.state)) return '\u2192 ' + version;
    return 'none \u2192 ' + version;
  }

  function deploymentNodes(d) {
    const rows = d.nodes.map((dn) => el('tr', { class: ['uploading', 'deploying', 'soaking', 'rolling-back'].includes(dn.state) ? 'current' : null },
      el('td', {}, el('a', { href: nodeHref(dn.node) }, dn.node)),
      el('td', {}, versionChange(dn, d.version)),
      el('td', {}, badge(dn.state, 'node-' + dn.state)),
      el('td', {}, dn.detail),
      el('td', {}, dn.instance_id),
      el('td', {}, when(dn.started_at, '')),
      el('td', {}, when(dn.finished_at, ''))));
    return table(['Node', 'Version', 'State', 'Detail', 'Instance', 'Started', 'Finished'], rows);
  }

  // --- alerts ------------------------------------------------------------------

  /** The monitor's answer: {configured, error, alerts}; absent from an old mesh-control. */
  function monitorOf(s) {
    return s.monitor || { configured: false, error: '', alerts: [] };
  }

  function severityBadge(severity) {
    return badge(severity, 'sev-' + severity);
  }

  /** The open alerts on a node (of its instances). */
  function nodeAlerts(s, name) {
    return monitorOf(s).alerts.filter((al) => al.node === name);
  }

  /** "2 critical, 1 warning", linking to the alerts page. */
  function alertsSummary(list) {
    const critical = list.filter((al) => al.severity === 'critical').length;
    const words = [];
    if (critical) words.push(critical + ' critical');
    if (list.length - critical) words.push(list.length - critical + ' warning');
    return el('a', { href: '#/alerts', class: critical ? 'sev-text-critical' : 'sev-text-warning' }, words.join(', '));
  }

  /** The count in the navigation: open alerts, colored by the worst; "!" when the monitor does not answer. */
  function alertCount(s) {
    const count = document.getElementById('alert-count');
    const monitor = monitorOf(s);
    const critical = monitor.alerts.filter((al) => al.severity === 'critical').length;
    if (monitor.error) {
      count.textContent = '!';
      count.className = 'alert-count sev-unknown';
      count.title = monitor.error;
    } else {
      count.textContent = String(monitor.alerts.length);
      count.className = 'alert-count ' + (critical ? 'sev-critical' : 'sev-warning');
      count.title = plural(critical, 'critical alert', 'critical alerts') + ', ' +
        plural(monitor.alerts.length - critical, 'warning', 'warnings');
    }
    count.hidden = !monitor.configured || (!monitor.error && !monitor.alerts.length);
  }

  function alertsPage(s) {
    const monitor = monitorOf(s);
    const heading = el('h1', {}, 'Alerts ', el('span', { class: 'count' }, '(' + monitor.alerts.length + ' open)'));
    if (!monitor.configured) {
      return [
        el('h1', {}, 'Alerts'),
        el('p', { class: 'empty' }, 'mesh-control runs without mesh-monitor: no alerts to show.'),
        el('p', { class: 'empty' },
          'Start mesh-monitor and give mesh-control its address (--monitor-addr, MESH_MONITOR_ADDR or ' +
          'monitor_addr in its config file) to see here what its probes find down, hung, unhealthy or slow.'),
      ];
    }
    if (monitor.error) {
      return [
        el('h1', {}, 'Alerts'),
        el('p', { class: 'reason monitor-error' }, 'mesh-monitor cannot be asked: ' + monitor.error),
      ];
    }
    if (!monitor.alerts.length) {
      return [heading, el('p', { class: 'empty' }, 'No open alerts: every probed instance and component answers in time.')];
    }
    const rows = monitor.alerts.map((al) => el('tr', { class: 'alert ' + al.severity.replace(/[^a-z]/g, ''), title: al.key },
      el('td', {}, severityBadge(al.severity)),
      el('td', {}, al.kind),
      el('td', { title: al.instance_id ? 'instance ' + al.instance_id : null },
        al.node ? [el('a', { href: nodeHref(al.node) }, al.node), '/' + al.target.slice(al.node.length + 1)] : al.target),
      el('td', {}, al.service),
      el('td', {}, when(al.started_at, 'unknown'),
        al.state !== 'open' ? [' ', badge(al.state), ' ', when(al.resolved_at, '')] : null),
      el('td', {}, el('code', {}, al.probe)),
      el('td', { class: 'evidence' }, al.evidence)));
    return [
      heading,
      el('p', { class: 'summary' }, alertsSummary(monitor.alerts), ' \u00b7 as mesh-monitor listed them, the critical ones first'),
      table(['Severity', 'Kind', 'Target', 'Service', 'Since', 'Probe', 'Evidence'], rows),
    ];
  }

  // --- intentions ------------------------------------------------------------

  /** Every intention and the default; absent from an old mesh-control. */
  function intentionsOf(s) {
    return s.intentions || { default: { action: 'deny', from: 'config', revision: 0 }, index: 0, intentions: [] };
  }

  function actionBadge(action) {
    return badge(action, 'intent-' + action);
  }

  /** A rule in words, as meshctl prints it: "allow GET,HEAD prefix /v1/". */
  function ruleText(rule) {
    const path = rule.path_exact ? 'exact ' + rule.path_exact
      : rule.path_prefix ? 'prefix ' + rule.path_prefix : 'any path';
    return [rule.action, (rule.methods || []).join(','), path].filter((w) => w).join(' ');
  }

  function intentionsPage(s) {
    const all = intentionsOf(s);
    const d = all.default;
    const heading = el('h1', {}, 'Intentions ', el('span', { class: 'count' }, '(' + all.intentions.length + ')'));
    const fallback = el('p', { class: 'summary intentions-default' }, 'Calls no intention matches: ', actionBadge(d.action),
      d.from === 'kv' ? ' (set in Consul KV, revision ' + d.revision + ')'
        : ' (mesh-control\'s default_intention; not set in Consul KV)');
    const precedence = el('p', { class: 'empty' },
      'The most specific intention decides (two names, then one, then *); equally specific ones that disagree deny; ' +
      'an allow with HTTP rules denies what no rule matches. Stored and checked by meshctl intentions check; ' +
      'proxies enforce them once mTLS between nodes lands.');
    if (!all.intentions.length) {
      return [heading, fallback, el('p', { class: 'empty' }, 'No intentions: every call gets the default.'), precedence];
    }
    const rows = all.intentions.map((i) => el('tr', { class: 'intention' },
      el('td', {}, i.source),
      el('td', {}, i.destination),
      el('td', {}, actionBadge(i.action)),
      el('td', {}, (i.http || []).length
        ? el('ul', { class: 'rules' }, i.http.map((r) => el('li', {}, el('code', {}, ruleText(r)))))
        : 'every call'),
      el('td', { class: 'num' }, i.revision),
      el('td', {}, i.description || '')));
    return [
      heading,
      fallback,
      table(['Source', 'Destination', 'Action', 'HTTP', 'Revision', 'Description'], rows),
      precedence,
    ];
  }

  // --- rendering -------------------------------------------------------------

  function render() {
    const r = route();
    for (const a of document.querySelectorAll('#nav a')) {
      const page = r.page === 'node' ? 'nodes' : r.page;
      a.classList.toggle('active', a.getAttribute('data-page') === page);
    }
    if (!snapshot) return;
    const s = snapshot;
    let content;
    if (r.page === 'node') content = nodePage(s, r.node, r.version);
    else if (r.page === 'services') content = servicesPage(s);
    else if (r.page === 'rollouts') content = rolloutsPage(s);
    else if (r.page === 'deployments') content = deploymentsPage(s);
    else if (r.page === 'alerts') content = alertsPage(s);
    else if (r.page === 'intentions') content = intentionsPage(s);
    else content = nodesPage(s);
    const main = document.getElementById('main');
    main.replaceChildren(...[content].flat(Infinity).filter((x) => x));
    alertCount(s);

    const banner = document.getElementById('banner');
    banner.hidden = !s.error;
    banner.textContent = s.error
      ? 'mesh-control cannot read the mesh\'s state: ' + s.error + '. Showing the last state read.'
      : '';

    const st = s.status;
    const leader = st.leader ? 'leader ' + st.leader + (st.is_leader ? ' (this replica)' : '') : 'no leader';
    document.getElementById('footer').textContent =
      'Replica ' + st.replica + ' \u00b7 ' + leader + ' \u00b7 updated ' + when(s.updated_at, 'never');
    document.title = 'Meshwork \u00b7 ' + (r.page === 'node' ? r.node : r.page);
  }

  function setConnection(word) {
    const conn = document.getElementById('conn');
    conn.textContent = word;
    conn.className = 'conn ' + word;
  }

  // --- live updates ----------------------------------------------------------

  function connect() {
    const events = new EventSource('/v1/events');
    events.addEventListener('open', () => setConnection('live'));
    events.addEventListener('error', () => setConnection('reconnecting'));
    events.addEventListener('state', (e) => {
      snapshot = JSON.parse(e.data);
      // A diff that failed is asked for again with the next state.
      for (const [key, entry] of diffs) if (entry.status === 'error') diffs.delete(key);
      setConnection('live');
      render();
    });
  }

  // --- sign-in ----------------------------------------------------------------
  // With an api_token set, /v1/... answers 401 until the browser holds the
  // session cookie POST /ui/login sets (HttpOnly: this script never sees it).

  function signIn() {
    const main = document.getElementById('main');
    main.textContent = '';
    const box = document.createElement('div');
    box.className = 'login';
    const label = document.createElement('label');
    label.textContent = 'API token ';
    const input = document.createElement('input');
    input.type = 'password';
    input.id = 'api-token';
    input.autocomplete = 'current-password';
    label.appendChild(input);
    const button = document.createElement('button');
    button.type = 'button';
    button.id = 'sign-in';
    button.textContent = 'Sign in';
    const note = document.createElement('p');
    note.className = 'error';
    const submit = () => {
      fetch('/ui/login', { method: 'POST', body: input.value, cache: 'no-store' })
        .then((r) => {
          if (!r.ok) throw new Error('wrong token');
          start();
        })
        .catch((e) => { note.textContent = String((e && e.message) || e); });
    };
    button.addEventListener('click', submit);
    input.addEventListener('keydown', (e) => { if (e.key === 'Enter') submit(); });
    box.append(label, button, note);
    main.appendChild(box);
    setConnection('signed-out');
    input.focus();
  }

  function start() {
    fetch('/ui/session', { cache: 'no-store' })
      .then((r) => {
        if (r.status === 401) return signIn();
        render();
        connect();
      })
      .catch(() => { render(); connect(); });
  }

  window.addEventListener('hashchange', render);
  render();
  start();
})();
