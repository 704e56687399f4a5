//! Pictures of demo runs: an SVG timeline per run (throughput, active devices, TTFT and TPOT
//! p99), with each scale event marked.

use std::fmt::Write as _;

use scaler_exec::demo::DemoRun;

const W: f64 = 900.0;
const PANEL_H: f64 = 120.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const GAP: f64 = 28.0;

struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    value: fn(&scaler_exec::demo::Sample) -> f64,
}

const PANELS: [Panel<'static>; 4] = [
    Panel {
        title: "throughput",
        unit: "tok/s",
        value: |s| s.tokens_per_s,
    },
    Panel {
        title: "active devices",
        unit: "devices",
        value: |s| s.devices as f64,
    },
    Panel {
        title: "TTFT p99",
        unit: "ms",
        value: |s| s.ttft_p99_ms,
    },
    Panel {
        title: "TPOT p99",
        unit: "ms",
        value: |s| s.tpot_p99_ms,
    },
];

const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// One run as the picture draws it: its name, its samples and its scale events (start time in
/// seconds and a label such as `up 1→2`).
pub struct Line<'a> {
    /// The legend (the strategy).
    pub name: &'a str,
    /// One sample per tick.
    pub timeline: &'a [scaler_exec::demo::Sample],
    /// Completed scale events.
    pub marks: Vec<(f64, String)>,
}

/// One SVG with a panel per metric; each run is one coloured line, scale events are dashed
/// vertical marks in the run's colour (labelled up/down on the first panel).
pub fn timeline_svg(runs: &[&DemoRun]) -> String {
    let lines: Vec<Line<'_>> = runs
        .iter()
        .map(|r| Line {
            name: &r.report.strategy,
            timeline: &r.timeline,
            marks: r
                .events
                .iter()
                .filter(|e| e.event.completed())
                .map(|e| {
                    let rep = &e.event.report;
                    (
                        e.start_s,
                        format!("{} {}→{}", rep.kind.as_str(), rep.from.len(), rep.to.len()),
                    )
                })
                .collect(),
        })
        .collect();
    lines_svg(&lines)
}

/// [`timeline_svg`] for runs of any backend.
pub fn lines_svg(runs: &[Line<'_>]) -> String {
    let t_max = runs
        .iter()
        .flat_map(|r| r.timeline.iter().map(|s| s.t_s))
        .fold(1.0f64, f64::max);
    let h = TOP + PANELS.len() as f64 * (PANEL_H + GAP) + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="16" fill="{}">{}</text>"#,
            LEFT + i as f64 * 150.0,
            COLOURS[i % COLOURS.len()],
            escape(r.name)
        );
    }
    let x_of = |t: f64| LEFT + (t / t_max) * (W - LEFT - RIGHT);
    for (p, panel) in PANELS.iter().enumerate() {
        let y0 = TOP + p as f64 * (PANEL_H + GAP);
        let v_max = runs
            .iter()
            .flat_map(|r| r.timeline.iter().map(panel.value))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let y_of = |v: f64| y0 + PANEL_H - (v / v_max) * PANEL_H;
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{y0}" width="{}" height="{PANEL_H}" fill="none" stroke="#999"/>"##,
            W - LEFT - RIGHT
        );
        let _ = writeln!(
            out,
            r##"<text x="4" y="{}">{}</text><text x="4" y="{}" fill="#666">{:.0} {}</text>"##,
            y0 + 12.0,
            panel.title,
            y0 + 26.0,
            v_max / 1.1,
            panel.unit
        );
        for (i, r) in runs.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<String> = r
                .timeline
                .iter()
                .map(|s| format!("{:.1},{:.1}", x_of(s.t_s), y_of((panel.value)(s))))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
            for (start_s, label) in &r.marks {
                let x = x_of(*start_s);
                let _ = writeln!(
                    out,
                    r#"<line x1="{x:.1}" x2="{x:.1}" y1="{y0}" y2="{}" stroke="{colour}" stroke-dasharray="4 3"/>"#,
                    y0 + PANEL_H
                );
                if p == 0 {
                    let _ = writeln!(
                        out,
                        r#"<text x="{:.1}" y="{}" fill="{colour}">{}</text>"#,
                        x + 2.0,
                        y0 + 12.0 + 12.0 * i as f64,
                        escape(label)
                    );
                }
            }
        }
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" fill="#666">time (s), 0 to {t_max:.0}</text>"##,
        W / 2.0 - 40.0,
        h - 6.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
