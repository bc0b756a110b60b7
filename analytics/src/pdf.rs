//! The sponsor report as a PDF a sales team can send: sponsor, period and
//! filters, the KPIs, a bar chart of the daily impressions drawn with vector
//! rectangles and lines, and the breakdowns (period, event type, top videos,
//! sites).
//!
//! Written with `lopdf` (pure Rust, well kept) using the standard Helvetica
//! fonts (WinAnsiEncoding; no font file to embed), so text is extractable
//! and searchable.

use crate::stats::{Figures, Stats};
use lopdf::content::{Content, Operation};
use lopdf::{dictionary, Document, Object, Stream};

const W: f32 = 595.0;
const H: f32 = 842.0;
const MARGIN: f32 = 40.0;
/// Sites listed in the PDF (the CSV has all of them).
pub const PDF_MAX_SITES: usize = 40;

/// `1234567` → `1,234,567`.
pub fn fmt_int(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Seconds as `12h 03m 09s`.
pub fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as i64;
    format!("{}h {:02}m {:02}s", fmt_int(s / 3600), (s % 3600) / 60, s % 60)
}

/// `0.8754` → `87.5 %`.
pub fn fmt_rate(r: f64) -> String {
    format!("{:.1} %", r * 100.0)
}

struct Page {
    ops: Vec<Operation>,
}

fn latin1(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| if (c as u32) < 256 { c as u32 as u8 } else { b'?' })
        .collect()
}

impl Page {
    fn new() -> Self {
        Page { ops: Vec::new() }
    }

    fn text(&mut self, x: f32, y: f32, size: f32, bold: bool, s: &str) {
        self.ops.push(Operation::new("BT", vec![]));
        self.ops.push(Operation::new(
            "Tf",
            vec![if bold { "F2" } else { "F1" }.into(), size.into()],
        ));
        self.ops.push(Operation::new("Td", vec![x.into(), y.into()]));
        self.ops
            .push(Operation::new("Tj", vec![Object::string_literal(latin1(s))]));
        self.ops.push(Operation::new("ET", vec![]));
    }

    fn fill(&mut self, rgb: (f32, f32, f32)) {
        self.ops
            .push(Operation::new("rg", vec![rgb.0.into(), rgb.1.into(), rgb.2.into()]));
    }

    fn rect(&mut self, x: f32, y: f32, w: f32, h: f32, rgb: (f32, f32, f32)) {
        self.fill(rgb);
        self.ops
            .push(Operation::new("re", vec![x.into(), y.into(), w.into(), h.into()]));
        self.ops.push(Operation::new("f", vec![]));
        self.fill((0.0, 0.0, 0.0));
    }

    fn line(&mut self, x1: f32, y1: f32, x2: f32, y2: f32, width: f32, gray: f32) {
        self.ops.push(Operation::new("G", vec![gray.into()]));
        self.ops.push(Operation::new("w", vec![width.into()]));
        self.ops.push(Operation::new("m", vec![x1.into(), y1.into()]));
        self.ops.push(Operation::new("l", vec![x2.into(), y2.into()]));
        self.ops.push(Operation::new("S", vec![]));
    }

    /// A table of figures; returns the y below it.
    fn table(&mut self, mut y: f32, title: &str, first_col: &str, rows: &[(String, &Figures)]) -> f32 {
        const COLS: [f32; 6] = [MARGIN, 250.0, 320.0, 410.0, 470.0, 520.0];
        self.text(MARGIN, y, 12.0, true, title);
        y -= 16.0;
        for (x, h) in COLS.iter().zip([
            first_col,
            "Impressions",
            "Screen time (s)",
            "Completed",
            "Rate",
            "Audience",
        ]) {
            self.text(*x, y, 8.0, true, h);
        }
        y -= 4.0;
        self.line(MARGIN, y, W - MARGIN, y, 0.5, 0.6);
        y -= 11.0;
        for (name, f) in rows {
            let name: String = name.chars().take(42).collect();
            let cells = [
                name,
                fmt_int(f.impressions),
                format!("{:.1}", f.screen_time_seconds),
                fmt_int(f.completed),
                fmt_rate(f.completion_rate),
                fmt_int(f.audience),
            ];
            for (x, c) in COLS.iter().zip(cells.iter()) {
                self.text(*x, y, 8.0, false, c);
            }
            y -= 11.0;
        }
        y - 12.0
    }
}

/// Renders the report.
pub fn render(s: &Stats, generated_at: chrono::DateTime<chrono::Utc>) -> anyhow::Result<Vec<u8>> {
    let mut p1 = Page::new();
    let mut y = H - MARGIN - 10.0;
    p1.rect(0.0, H - 70.0, W, 70.0, (0.11, 0.24, 0.45));
    p1.fill((1.0, 1.0, 1.0));
    p1.text(
        MARGIN,
        H - 45.0,
        20.0,
        true,
        &format!("Sponsor report: {}", s.sponsor.name),
    );
    p1.fill((0.0, 0.0, 0.0));
    y -= 60.0;
    p1.text(
        MARGIN,
        y,
        10.0,
        false,
        &format!("Sponsor: {} ({})", s.sponsor.name, s.sponsor.id),
    );
    y -= 14.0;
    p1.text(
        MARGIN,
        y,
        10.0,
        false,
        &format!("Period: {} to {} (UTC days, {} days)", s.from, s.to, s.daily.len()),
    );
    y -= 14.0;
    let filters = match s.filters.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "none".to_owned(),
    };
    p1.text(
        MARGIN,
        y,
        10.0,
        false,
        &format!(
            "Filters: {filters}    Generated: {} UTC",
            generated_at.format("%Y-%m-%d %H:%M")
        ),
    );
    y -= 24.0;

    // KPI tiles, 3 x 2.
    let kpis = [
        ("Total impressions", fmt_int(s.total_impressions)),
        (
            "Screen time",
            format!("{} s", fmt_int(s.screen_time_seconds.round() as i64)),
        ),
        ("Completed plays", fmt_int(s.completed)),
        ("Completion rate", fmt_rate(s.completion_rate)),
        ("Sites reached", fmt_int(s.sites_reached)),
        ("Audience reached", fmt_int(s.audience_reached)),
    ];
    let tile_w = (W - 2.0 * MARGIN - 20.0) / 3.0;
    for (i, (label, value)) in kpis.iter().enumerate() {
        let col = (i % 3) as f32;
        let row = (i / 3) as f32;
        let x = MARGIN + col * (tile_w + 10.0);
        let ty = y - row * 58.0;
        p1.rect(x, ty - 48.0, tile_w, 48.0, (0.93, 0.95, 0.98));
        p1.text(x + 8.0, ty - 16.0, 9.0, false, label);
        p1.text(x + 8.0, ty - 38.0, 16.0, true, value);
    }
    y -= 2.0 * 58.0 + 6.0;
    p1.text(
        MARGIN,
        y,
        9.0,
        false,
        &format!(
            "Screen time {} - average {:.1} s per play - {} videos attributed",
            fmt_duration(s.screen_time_seconds),
            s.average_seconds_per_play,
            s.videos_attributed
        ),
    );
    y -= 26.0;

    // Daily impressions chart.
    p1.text(MARGIN, y, 12.0, true, "Daily impressions");
    y -= 10.0;
    let (cx, cw, ch) = (MARGIN + 40.0, W - 2.0 * MARGIN - 40.0, 150.0);
    let cy = y - ch;
    let max = s.daily.iter().map(|d| d.figures.impressions).max().unwrap_or(0).max(1);
    for frac in [0.0f32, 0.5, 1.0] {
        let gy = cy + ch * frac;
        p1.line(cx, gy, cx + cw, gy, 0.3, 0.85);
        p1.text(
            MARGIN,
            gy - 3.0,
            7.0,
            false,
            &fmt_int((max as f32 * frac).round() as i64),
        );
    }
    let n = s.daily.len().max(1) as f32;
    let slot = cw / n;
    for (i, d) in s.daily.iter().enumerate() {
        let h = ch * d.figures.impressions as f32 / max as f32;
        if h > 0.0 {
            p1.rect(
                cx + i as f32 * slot + slot * 0.1,
                cy,
                (slot * 0.8).max(0.3),
                h,
                (0.18, 0.45, 0.8),
            );
        }
    }
    p1.line(cx, cy, cx + cw, cy, 0.8, 0.0);
    p1.line(cx, cy, cx, cy + ch, 0.8, 0.0);
    if let (Some(first), Some(last)) = (s.daily.first(), s.daily.last()) {
        p1.text(cx, cy - 11.0, 7.0, false, &first.day.to_string());
        p1.text(cx + cw - 40.0, cy - 11.0, 7.0, false, &last.day.to_string());
    }
    y = cy - 30.0;

    let rows: Vec<(String, &Figures)> = s.by_period.iter().map(|k| (k.key.clone(), &k.figures)).collect();
    y = p1.table(y, "By period", "Period", &rows);
    let rows: Vec<(String, &Figures)> = s.by_event_type.iter().map(|k| (k.key.clone(), &k.figures)).collect();
    p1.table(y, "By event type", "Event type", &rows);

    let mut p2 = Page::new();
    let mut y = H - MARGIN - 10.0;
    let rows: Vec<(String, &Figures)> = s
        .top_videos
        .iter()
        .map(|v| {
            let name = match &v.video_id {
                Some(id) => format!("{} [{id}]", v.video_filename),
                None => v.video_filename.clone(),
            };
            (name, &v.figures)
        })
        .collect();
    y = p2.table(y, "Top videos", "Video", &rows);
    let rows: Vec<(String, &Figures)> = s
        .by_site
        .iter()
        .take(PDF_MAX_SITES)
        .map(|site| {
            let name = match &site.site_name {
                Some(n) => format!("{} ({})", n, site.site_id),
                None => site.site_id.clone(),
            };
            (name, &site.figures)
        })
        .collect();
    y = p2.table(
        y,
        &format!("Sites ({} reached)", fmt_int(s.sites_reached)),
        "Site",
        &rows,
    );
    if s.by_site.len() > PDF_MAX_SITES {
        p2.text(
            MARGIN,
            y,
            8.0,
            false,
            &format!(
                "... and {} more sites: see the CSV export for every site.",
                s.by_site.len() - PDF_MAX_SITES
            ),
        );
    }
    p2.text(
        MARGIN,
        MARGIN - 10.0,
        7.0,
        false,
        "NeoPro - figures from the plays recorded by the venue players; days are UTC.",
    );

    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let f1 = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica", "Encoding" => "WinAnsiEncoding",
    });
    let f2 = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica-Bold", "Encoding" => "WinAnsiEncoding",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => f1, "F2" => f2 },
    });
    let mut kids = Vec::new();
    for page in [p1, p2] {
        let content = Content { operations: page.ops };
        let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode()?));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page",
            "Parent" => pages_id,
            "Contents" => content_id,
        });
        kids.push(Object::from(page_id));
    }
    let count = kids.len() as i64;
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages",
            "Kids" => kids,
            "Count" => count,
            "Resources" => resources_id,
            "MediaBox" => vec![0.into(), 0.into(), W.into(), H.into()],
        }),
    );
    let info_id = doc.add_object(dictionary! {
        "Title" => Object::string_literal(latin1(&format!("{} sponsor report {}..{}", s.sponsor.name, s.from, s.to))),
        "Producer" => Object::string_literal("neopro-analytics"),
    });
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog_id);
    doc.trailer.set("Info", info_id);
    doc.compress();
    let mut out = Vec::new();
    doc.save_to(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(999), "999");
        assert_eq!(fmt_int(1000), "1,000");
        assert_eq!(fmt_int(1234567), "1,234,567");
        assert_eq!(fmt_int(-1234), "-1,234");
        assert_eq!(fmt_duration(3725.4), "1h 02m 05s");
        assert_eq!(fmt_rate(0.8754), "87.5 %");
    }
}
