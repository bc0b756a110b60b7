// NeoPro sponsor dashboard. The page itself holds no data; it calls the API
// with a bearer token kept in this browser's localStorage (given once with
// ?token=... in the URL, which is then removed from the address bar, or typed
// in the form shown when no token is stored or the API answers 401).
(function () {
  'use strict';
  var TOKEN_KEY = 'neopro_analytics_token';
  var m = location.pathname.match(/^\/sponsors\/([^/]+)\/analytics\/?$/);
  var sponsorId = m ? decodeURIComponent(m[1]) : '';
  var params = new URLSearchParams(location.search);
  if (params.get('token')) {
    localStorage.setItem(TOKEN_KEY, params.get('token'));
    params.delete('token');
    var q = params.toString();
    history.replaceState(null, '', location.pathname + (q ? '?' + q : ''));
  }
  var charts = {};
  var $ = function (id) { return document.getElementById(id); };
  var nf = new Intl.NumberFormat('en-US');

  function isoDay(d) { return d.toISOString().slice(0, 10); }
  function setStatus(text, isError) {
    var s = $('status');
    s.textContent = text;
    s.className = isError ? 'error' : '';
  }
  function token() { return localStorage.getItem(TOKEN_KEY) || ''; }
  function askToken() {
    $('token-form').style.display = 'block';
    document.body.dataset.state = 'need-token';
  }

  var today = new Date();
  var from = params.get('from') || isoDay(new Date(today.getTime() - 29 * 86400000));
  var to = params.get('to') || isoDay(today);
  $('from').value = from;
  $('to').value = to;
  ['period', 'event_type', 'site_id'].forEach(function (k) { if (params.get(k)) { $(k).value = params.get(k); } });

  function query() {
    var q = new URLSearchParams();
    q.set('from', $('from').value);
    q.set('to', $('to').value);
    ['period', 'event_type', 'site_id'].forEach(function (k) { var v = $(k).value.trim(); if (v) { q.set(k, v); } });
    return q.toString();
  }
  function api(path) {
    return fetch(path, { headers: { 'Authorization': 'Bearer ' + token() } }).then(function (r) {
      if (r.status === 401) { askToken(); throw new Error('the API refused the token (401): enter a valid one'); }
      if (!r.ok) {
        return r.json().catch(function () { return {}; }).then(function (b) {
          throw new Error((b && b.error) || ('HTTP ' + r.status));
        });
      }
      return r;
    });
  }

  function setKpi(id, raw, text) {
    var el = $(id);
    el.dataset.value = String(raw);
    el.textContent = text;
  }
  function hms(secs) {
    var s = Math.round(secs), h = Math.floor(s / 3600), mnt = Math.floor((s % 3600) / 60);
    return nf.format(h) + 'h ' + String(mnt).padStart(2, '0') + 'm';
  }
  function chart(id, type, labels, data, extra) {
    if (charts[id]) { charts[id].destroy(); }
    var opts = { animation: false, responsive: true, maintainAspectRatio: false, plugins: { legend: { display: false } } };
    if (extra) { Object.keys(extra).forEach(function (k) { opts[k] = extra[k]; }); }
    charts[id] = new Chart($(id), {
      type: type,
      data: { labels: labels, datasets: [{ label: 'Impressions', data: data, backgroundColor: '#2e73cc', borderColor: '#2e73cc' }] },
      options: opts
    });
  }

  function render(s) {
    $('sponsor-name').textContent = s.sponsor.name;
    $('sponsor-id').textContent = s.sponsor.id + ' - ' + s.from + ' to ' + s.to + ' (UTC)';
    document.title = s.sponsor.name + ' - sponsor analytics';
    setKpi('kpi-total-impressions', s.total_impressions, nf.format(s.total_impressions));
    setKpi('kpi-screen-time', s.screen_time_seconds, hms(s.screen_time_seconds));
    setKpi('kpi-completed', s.completed, nf.format(s.completed));
    setKpi('kpi-completion-rate', s.completion_rate, (s.completion_rate * 100).toFixed(1) + ' %');
    setKpi('kpi-sites-reached', s.sites_reached, nf.format(s.sites_reached));
    setKpi('kpi-audience-reached', s.audience_reached, nf.format(s.audience_reached));
    if (window.Chart) {
      chart('chart-daily', 'bar', s.daily.map(function (d) { return d.day; }), s.daily.map(function (d) { return d.impressions; }));
      chart('chart-period', 'bar', s.by_period.map(function (d) { return d.key; }), s.by_period.map(function (d) { return d.impressions; }));
      chart('chart-event', 'bar', s.by_event_type.map(function (d) { return d.key; }), s.by_event_type.map(function (d) { return d.impressions; }));
      chart('chart-videos', 'bar', s.top_videos.map(function (v) { return v.video_filename; }), s.top_videos.map(function (v) { return v.impressions; }), { indexAxis: 'y' });
    }
    var tb = $('sites-body');
    tb.textContent = '';
    s.by_site.slice(0, 100).forEach(function (site) {
      var tr = document.createElement('tr');
      [site.site_name ? site.site_name + ' (' + site.site_id + ')' : site.site_id, nf.format(site.impressions),
       site.screen_time_seconds.toFixed(1), nf.format(site.completed), nf.format(site.audience)].forEach(function (v, i) {
        var td = document.createElement('td');
        td.textContent = v;
        if (i > 0) { td.className = 'num'; }
        tr.appendChild(td);
      });
      tb.appendChild(tr);
    });
  }

  var base = '/api/analytics/sponsors/' + encodeURIComponent(sponsorId);
  function load() {
    if (!token()) { askToken(); setStatus('an API token is needed to read the figures', true); return; }
    document.body.dataset.state = 'loading';
    setStatus('loading...');
    api(base + '/stats?' + query()).then(function (r) { return r.json(); }).then(function (s) {
      render(s);
      setStatus('');
      document.body.dataset.state = 'ready';
    }).catch(function (e) {
      setStatus(e.message, true);
      if (document.body.dataset.state !== 'need-token') { document.body.dataset.state = 'error'; }
    });
  }
  function download(kind, ext) {
    api(base + '/' + kind + '?' + query()).then(function (r) { return r.blob(); }).then(function (b) {
      var a = document.createElement('a');
      a.href = URL.createObjectURL(b);
      a.download = sponsorId + '_' + $('from').value + '_' + $('to').value + '_' + kind.replace(/\..*$/, '') + '.' + ext;
      document.body.appendChild(a);
      a.click();
      setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    }).catch(function (e) { setStatus(e.message, true); });
  }

  $('range-form').addEventListener('submit', function (e) { e.preventDefault(); load(); });
  $('token-form').addEventListener('submit', function (e) {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $('token-input').value.trim());
    $('token-form').style.display = 'none';
    load();
  });
  $('csv-btn').addEventListener('click', function () { download('stats.csv', 'csv'); });
  $('pdf-btn').addEventListener('click', function () { download('report.pdf', 'pdf'); });
  $('playouts-btn').addEventListener('click', function () { download('playouts.csv', 'csv'); });
  load();
})();
