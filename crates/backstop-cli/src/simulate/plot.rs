//! `--plot FILE`: an SVG of offered load versus load reaching the provider over time,
//! one panel per policy, for one scenario.
//!
//! SVG is plain text, so this needs no plotting crate: a few polylines and labels.

use std::fmt::Write;

use super::report::ScenarioReport;

const PANEL_W: f64 = 640.0;
const PANEL_H: f64 = 150.0;
const MARGIN_L: f64 = 56.0;
const MARGIN_T: f64 = 28.0;
const GAP: f64 = 36.0;

/// Renders `scenario` as an SVG document.
pub fn render_svg(scenario: &ScenarioReport) -> String {
    let panels = scenario.policies.len().max(1);
    let width = MARGIN_L + PANEL_W + 24.0;
    let height = MARGIN_T + panels as f64 * (PANEL_H + GAP) + 8.0;
    // One y scale for every panel, so amplification is comparable between policies.
    let y_max = scenario
        .policies
        .iter()
        .flat_map(|p| p.timeline.iter().map(|t| t.offered.max(t.upstream)))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let t_max = scenario
        .policies
        .iter()
        .flat_map(|p| p.timeline.last().map(|t| t.t_s))
        .max()
        .unwrap_or(1)
        .max(1) as f64;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{MARGIN_L}" y="16" font-size="13">{}: offered load (grey) vs attempts reaching the provider (red), per simulated second</text>"##,
        escape(&scenario.name)
    );
    for (i, policy) in scenario.policies.iter().enumerate() {
        let top = MARGIN_T + i as f64 * (PANEL_H + GAP);
        let x = |t: u64| MARGIN_L + t as f64 / t_max * PANEL_W;
        let y = |v: u64| top + PANEL_H - v as f64 / y_max * PANEL_H;
        let _ = writeln!(
            svg,
            r##"<rect x="{MARGIN_L}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<text x="{MARGIN_L}" y="{}">{} (amplification {:.2}, success {:.1} %)</text>"##,
            top - 4.0,
            escape(&policy.policy),
            policy.amplification,
            policy.success_rate * 100.0
        );
        let _ = writeln!(
            svg,
            r##"<text x="4" y="{}">{}</text>"##,
            top + 10.0,
            y_max as u64
        );
        let _ = writeln!(svg, r##"<text x="4" y="{}">0</text>"##, top + PANEL_H);
        for (series, colour) in [(0, "#888"), (1, "#c22")] {
            let points: Vec<String> = policy
                .timeline
                .iter()
                .map(|p| {
                    let v = if series == 0 { p.offered } else { p.upstream };
                    format!("{:.1},{:.1}", x(p.t_s), y(v))
                })
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"##,
                points.join(" ")
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="{MARGIN_L}" y="{}">simulated time: 0 to {} s</text>"##,
        height - 2.0,
        t_max as u64
    );
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
