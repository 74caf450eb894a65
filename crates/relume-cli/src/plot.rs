//! `relume plot`: training and validation curves from a run's `metrics.csv`.
//!
//! One panel per metric, step on the x axis. Metrics that differ only by a split
//! marker share a panel with one curve per split: `train_loss`/`val_loss`,
//! `loss/train`/`loss/val`, `train/loss`/`val/loss` and `loss_train`/`loss_val`
//! all become a `loss` panel (splits `train`, `val`, `test`). A metric without a
//! partner keeps its own name. Empty, unparsable and non-finite cells are
//! skipped.
//!
//! The image is titled with the run directory's name; each panel has `step` on
//! its x axis and the metric's name on its y axis. Panels of loss metrics (the
//! name contains `loss`) whose values are all positive use a logarithmic y axis,
//! so a train loss near zero stays readable; `--log-y` does so for every panel
//! with positive values, `--linear-y` for none.
//!
//! The output format follows the extension: `.png` (plotters' bitmap backend,
//! encoded with the `png` crate) or `.svg`. Text is rendered with an embedded
//! DejaVu Sans Mono (`assets/`), so no system font is needed. In PNGs it is
//! rasterised by [`GlyphText`], which places each glyph at its side bearing
//! (plotters' own bitmap text drops it, printing `0.95` as `0. 95`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Default image width in pixels.
pub const DEFAULT_WIDTH: u32 = 1200;
/// Default image height in pixels.
pub const DEFAULT_HEIGHT: u32 = 800;
/// Smallest accepted width or height.
pub const MIN_SIZE: u32 = 100;
/// Largest accepted width or height (bounds the bitmap's memory).
pub const MAX_SIZE: u32 = 16_384;

/// The embedded font (Bitstream Vera licence; see `assets/DejaVuSansMono.LICENSE`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
/// Family name the font is registered under.
const FAMILY: &str = "sans-serif";

/// Curve colours: train, val, test, then others.
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
];

/// Arguments of `relume plot`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Draw training and validation curves from a run's metrics.csv",
    after_help = "Example:\n  relume plot runs/digits -o curves.png\n  relume plot runs/digits/logs/metrics.csv -o curves.svg --width 1600 --height 900 --log-y\n\nOne panel per metric (train/val/test splits share one), x axis: step, y axis: the\nmetric; the title is the run directory's name. The y axis is logarithmic for loss\nmetrics (names containing `loss`) when all their values are positive, linear\notherwise; --log-y makes it logarithmic for every panel with positive values,\n--linear-y for none. Prints the path written."
)]
pub struct PlotArgs {
    /// Run directory (reads `<RUN_DIR>/logs/metrics.csv`) or a metrics CSV file.
    pub run_dir: PathBuf,
    /// Output image; the extension picks the format (`.png` or `.svg`).
    #[arg(short = 'o', long = "out", default_value = "curves.png")]
    pub out: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = DEFAULT_WIDTH)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = DEFAULT_HEIGHT)]
    pub height: u32,
    /// Logarithmic y axis for every panel whose values are all positive (default:
    /// only loss panels).
    #[arg(long, conflicts_with = "linear_y")]
    pub log_y: bool,
    /// Linear y axis for every panel, loss panels included.
    #[arg(long)]
    pub linear_y: bool,
}

/// Which panels get a logarithmic y axis (only ever those with all values > 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YScale {
    /// Loss panels (title containing `loss`).
    Auto,
    /// Every panel.
    Log,
    /// None.
    Linear,
}

/// What was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    /// The title: the run directory's name.
    pub title: String,
    /// Panel titles, each with whether its y axis is logarithmic.
    pub panels: Vec<(String, bool)>,
}

/// Runs `relume plot` with parsed arguments.
///
/// # Errors
/// As [`plot_with_size`].
pub fn run(args: &PlotArgs) -> anyhow::Result<()> {
    let scale = match (args.log_y, args.linear_y) {
        (true, _) => YScale::Log,
        (_, true) => YScale::Linear,
        _ => YScale::Auto,
    };
    let drawn = plot_with(&args.run_dir, &args.out, args.width, args.height, scale)?;
    let panels: Vec<String> = drawn
        .panels
        .iter()
        .map(|(t, log)| {
            if *log {
                format!("{t} (log y)")
            } else {
                t.clone()
            }
        })
        .collect();
    println!(
        "wrote {} ({}x{}; {}: {})",
        args.out.display(),
        args.width,
        args.height,
        drawn.title,
        panels.join(", ")
    );
    Ok(())
}

/// Plots `run_dir_or_csv` into `out` at the default size.
///
/// # Errors
/// As [`plot_with_size`].
pub fn plot(run_dir_or_csv: &Path, out: &Path) -> anyhow::Result<()> {
    plot_with_size(run_dir_or_csv, out, DEFAULT_WIDTH, DEFAULT_HEIGHT)
}

/// Plots the metrics of `run_dir_or_csv` (a run directory or a CSV file) into
/// `out` (`.png` or `.svg`) at `width`×`height` pixels.
///
/// # Errors
/// The CSV is missing or unreadable, has no `step` column or no metric values;
/// the size is outside [`MIN_SIZE`]..=[`MAX_SIZE`]; the extension is neither
/// `.png` nor `.svg`; drawing or writing the image fails.
pub fn plot_with_size(
    run_dir_or_csv: &Path,
    out: &Path,
    width: u32,
    height: u32,
) -> anyhow::Result<()> {
    plot_with(run_dir_or_csv, out, width, height, YScale::Auto).map(|_| ())
}

/// As [`plot_with_size`], with the y-axis choice `scale`; says what was drawn.
///
/// # Errors
/// As [`plot_with_size`].
pub fn plot_with(
    run_dir_or_csv: &Path,
    out: &Path,
    width: u32,
    height: u32,
    scale: YScale,
) -> anyhow::Result<Drawn> {
    for (what, v) in [("width", width), ("height", height)] {
        if !(MIN_SIZE..=MAX_SIZE).contains(&v) {
            bail!("--{what} {v} is out of range: use {MIN_SIZE}..={MAX_SIZE} pixels");
        }
    }
    let format = match out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => Format::Png,
        Some("svg") => Format::Svg,
        _ => bail!(
            "output {}: unsupported image format; name it .png or .svg",
            out.display()
        ),
    };
    let csv = metrics_path(run_dir_or_csv);
    let text = std::fs::read_to_string(&csv)
        .with_context(|| format!("cannot read metrics file {}", csv.display()))?;
    let panels = panels(&text).with_context(|| format!("metrics file {}", csv.display()))?;
    let title = run_name(run_dir_or_csv);
    let drawn = Drawn {
        panels: panels
            .iter()
            .map(|p| (p.title.clone(), log_y(p, scale)))
            .collect(),
        title,
    };
    register_font()?;
    let bytes = match format {
        Format::Png => {
            let mut buf = vec![0u8; width as usize * height as usize * 3];
            {
                let bitmap = BitMapBackend::with_buffer(&mut buf, (width, height));
                let root = GlyphText::new(bitmap)?.into_drawing_area();
                draw(&root, &panels, &drawn)?;
                root.present()
                    .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
            }
            encode_png(&buf, width, height)?
        }
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
                draw(&root, &panels, &drawn)?;
                root.present()
                    .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
            }
            svg.into_bytes()
        }
    };
    write_file(out, &bytes)?;
    Ok(drawn)
}

/// The run's name for the title: the run directory's name (for a CSV path, the
/// directory holding `logs/`, or the CSV's own directory).
fn run_name(p: &Path) -> String {
    let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = if abs.is_dir() {
        Some(abs.as_path())
    } else {
        abs.parent().map(|d| match d.file_name() {
            Some(n) if n == "logs" => d.parent().unwrap_or(d),
            _ => d,
        })
    };
    dir.and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Whether `panel` gets a logarithmic y axis under `scale`.
fn log_y(panel: &Panel, scale: YScale) -> bool {
    let positive = panel
        .series
        .iter()
        .all(|(_, pts)| pts.iter().all(|&(_, y)| y > 0.0));
    positive
        && match scale {
            YScale::Auto => panel.title.contains("loss"),
            YScale::Log => true,
            YScale::Linear => false,
        }
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Png,
    Svg,
}

/// `<dir>/logs/metrics.csv` for a directory, the path itself otherwise.
fn metrics_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        let logs = p.join("logs").join("metrics.csv");
        if logs.exists() || !p.join("metrics.csv").exists() {
            return logs;
        }
        return p.join("metrics.csv");
    }
    p.to_path_buf()
}

/// One panel: a title and its curves.
#[derive(Debug, Clone, PartialEq)]
struct Panel {
    title: String,
    /// `(label, points)`, in split order (train, val, test, others).
    series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Splits `name` into a base and a split marker, if it has one.
fn split_name(name: &str) -> (String, Option<&'static str>) {
    for split in ["train", "val", "test"] {
        for (pre, suf) in [
            (format!("{split}_"), String::new()),
            (format!("{split}/"), String::new()),
            (String::new(), format!("_{split}")),
            (String::new(), format!("/{split}")),
        ] {
            if let Some(base) = name
                .strip_prefix(pre.as_str())
                .and_then(|r| r.strip_suffix(suf.as_str()))
            {
                if !base.is_empty() && base.len() < name.len() {
                    return (base.to_string(), Some(split));
                }
            }
        }
    }
    (name.to_string(), None)
}

/// Reads the CSV text into panels, sorted by title.
fn panels(text: &str) -> anyhow::Result<Vec<Panel>> {
    let table = parse_csv(text);
    let Some((header, rows)) = table.split_first() else {
        bail!("is empty: no header line");
    };
    let Some(step_col) = header.iter().position(|h| h == "step") else {
        bail!("has no `step` column (header: {})", header.join(","));
    };
    let mut columns: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for row in rows {
        let Some(step) = row.get(step_col).and_then(|s| s.trim().parse::<f64>().ok()) else {
            continue;
        };
        for (i, name) in header.iter().enumerate() {
            if i == step_col {
                continue;
            }
            let value = row.get(i).and_then(|s| s.trim().parse::<f64>().ok());
            if let Some(v) = value.filter(|v| v.is_finite()) {
                columns.entry(name.as_str()).or_default().push((step, v));
            }
        }
    }
    if columns.is_empty() {
        bail!("has no metric values to plot");
    }
    let mut groups: BTreeMap<String, Vec<(&'static str, &str)>> = BTreeMap::new();
    for name in columns.keys() {
        let (base, split) = split_name(name);
        if let Some(split) = split {
            groups.entry(base).or_default().push((split, name));
        }
    }
    let mut out: BTreeMap<String, Panel> = BTreeMap::new();
    for (name, points) in &columns {
        let (base, split) = split_name(name);
        let shared = split.is_some() && groups.get(&base).is_some_and(|g| g.len() > 1);
        let (title, label) = if shared {
            (base, split.unwrap_or_default().to_string())
        } else {
            (name.to_string(), name.to_string())
        };
        let mut points = points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.entry(title.clone())
            .or_insert_with(|| Panel {
                title,
                series: Vec::new(),
            })
            .series
            .push((label, points));
    }
    let rank = |l: &str| {
        ["train", "val", "test"]
            .iter()
            .position(|s| *s == l)
            .unwrap_or(3)
    };
    let mut panels: Vec<Panel> = out.into_values().collect();
    for p in &mut panels {
        p.series
            .sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
    }
    Ok(panels)
}

/// Draws the title and the panels in a near-square grid below it.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    drawn: &Drawn,
) -> anyhow::Result<()> {
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(fail)?;
    let body = root.titled(&drawn.title, (FAMILY, 22)).map_err(fail)?;
    let n = panels.len();
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(1);
    let rows = n.div_ceil(cols);
    let areas = body.split_evenly((rows, cols));
    for ((panel, area), (_, log)) in panels.iter().zip(areas.iter()).zip(&drawn.panels) {
        let points = panel.series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&panel.title, (FAMILY, 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(78);
        if *log {
            let (y0, y1) = if y1 > y0 {
                (y0 / 1.5, y1 * 1.5)
            } else {
                (y0 / 2.0, y0 * 2.0)
            };
            let chart = builder
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(fail)?;
            draw_panel(chart, panel, "log scale")?;
        } else {
            let pad = if y1 > y0 {
                (y1 - y0) * 0.05
            } else {
                y0.abs().max(1.0) * 0.1
            };
            let chart = builder
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
                .map_err(fail)?;
            draw_panel(chart, panel, "")?;
        }
    }
    Ok(())
}

/// Draws one panel's mesh, axis labels, curves and legend into `chart`;
/// `scale_note` is appended to the y-axis label.
fn draw_panel<'a, DB, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    panel: &Panel,
    scale_note: &str,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    let y_desc = if scale_note.is_empty() {
        panel.title.clone()
    } else {
        format!("{} ({scale_note})", panel.title)
    };
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .x_labels(6)
        .x_label_formatter(&step_label)
        .y_labels(6)
        .y_label_formatter(&tick_label)
        .draw()
        .map_err(fail)?;
    for (i, (label, pts)) in panel.series.iter().enumerate() {
        let color = COLORS[(["train", "val", "test"]
            .iter()
            .position(|s| s == label)
            .unwrap_or(i))
            % COLORS.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        let series = chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(fail)?;
        series
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        if pts.len() < 2 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(fail)?;
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(fail)?;
    }
    Ok(())
}

/// A y tick: up to four significant digits without trailing zeros (`0.95`,
/// `1.5`, `0`), exponent form for tiny or huge values (`1e-5`, `2.5e6`).
fn tick_label(y: &f64) -> String {
    let y = *y;
    if y == 0.0 || !y.is_finite() {
        return format!("{y}");
    }
    let a = y.abs();
    if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i64).clamp(0, 6) as usize;
        let s = format!("{y:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        let s = format!("{y:.3e}");
        match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        }
    }
}

/// Steps are integers: `200`, not `200.0`; fractional ticks of short runs keep
/// their decimals.
fn step_label(x: &f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x}")
    }
}

/// A bitmap backend whose text is rasterised with `ab_glyph` directly, each glyph
/// placed at its side bearing. Everything else goes to the wrapped backend.
///
/// plotters 0.3.7's `ab_glyph` text drops the bearing, so narrow glyphs such as
/// `.` sit at the left of their cell and `0.95` reads `0. 95`.
struct GlyphText<DB> {
    inner: DB,
    font: ab_glyph::FontRef<'static>,
}

impl<DB: DrawingBackend> GlyphText<DB> {
    fn new(inner: DB) -> anyhow::Result<Self> {
        let font = ab_glyph::FontRef::try_from_slice(FONT)
            .map_err(|e| anyhow!("the embedded font is invalid: {e}"))?;
        Ok(GlyphText { inner, font })
    }
}

type BackendResult<E> = Result<(), plotters_backend::DrawingErrorKind<E>>;

impl<DB: DrawingBackend> DrawingBackend for GlyphText<DB> {
    type ErrorType = DB::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> BackendResult<DB::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> BackendResult<DB::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: plotters_backend::BackendCoord,
        color: plotters_backend::BackendColor,
    ) -> BackendResult<DB::ErrorType> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: plotters_backend::BackendCoord,
        to: plotters_backend::BackendCoord,
        style: &S,
    ) -> BackendResult<DB::ErrorType> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: plotters_backend::BackendCoord,
        bottom_right: plotters_backend::BackendCoord,
        style: &S,
        fill: bool,
    ) -> BackendResult<DB::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: plotters_backend::BackendStyle, I>(
        &mut self,
        path: I,
        style: &S,
    ) -> BackendResult<DB::ErrorType>
    where
        I: IntoIterator<Item = plotters_backend::BackendCoord>,
    {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: plotters_backend::BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> BackendResult<DB::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: plotters_backend::BackendStyle, I>(
        &mut self,
        vert: I,
        style: &S,
    ) -> BackendResult<DB::ErrorType>
    where
        I: IntoIterator<Item = plotters_backend::BackendCoord>,
    {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: plotters_backend::BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> BackendResult<DB::ErrorType> {
        self.inner.blit_bitmap(pos, size, src)
    }

    /// plotters' default text drawing (anchor, rotation, clipping) with glyphs
    /// offset by their bearing.
    fn draw_text<T: plotters_backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: plotters_backend::BackendCoord,
    ) -> BackendResult<DB::ErrorType> {
        use ab_glyph::{Font, ScaleFont};
        use plotters_backend::text_anchor::{HPos, VPos};
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| plotters_backend::DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let (w, h) = self.get_size();
        let size = style.size() as f32;
        let font = self.font.as_scaled(size);
        let mut pixels = Vec::new();
        let mut pen = 0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            prev = Some(id);
            if let Some(q) = font.outline_glyph(font.scaled_glyph(c)) {
                let rect = q.px_bounds();
                // As plotters: the text's vertical middle at half the size.
                let y0 = (size / 2.0 + rect.min.y) as i32;
                let x0 = (pen + rect.min.x).round() as i32;
                q.draw(|x, y, cover| pixels.push((x0 + x as i32, y0 + y as i32, cover)));
            }
            pen += font.h_advance(id);
        }
        for (x, y, cover) in pixels {
            let (x, y) = trans.transform(x + dx - min_x, y + dy - min_y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if x >= 0 && x < w as i32 && y >= 0 && y < h as i32 {
                let c = plotters_backend::BackendColor {
                    alpha: color.alpha * f64::from(cover.clamp(0.0, 1.0)),
                    rgb: color.rgb,
                };
                self.inner.draw_pixel((x, y), c)?;
            }
        }
        Ok(())
    }

    fn estimate_text_size<T: plotters_backend::BackendTextStyle>(
        &self,
        text: &str,
        style: &T,
    ) -> Result<(u32, u32), plotters_backend::DrawingErrorKind<DB::ErrorType>> {
        self.inner.estimate_text_size(text, style)
    }
}

/// Registers the embedded font once per process.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        [FontStyle::Normal, FontStyle::Bold]
            .into_iter()
            .all(|style| plotters::style::register_font(FAMILY, style, FONT).is_ok())
    });
    if !ok {
        bail!("the embedded font assets/DejaVuSansMono.ttf is invalid; rebuild relume-cli");
    }
    Ok(())
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("encoding PNG header")?;
        writer.write_image_data(rgb).context("encoding PNG data")?;
        writer.finish().context("finishing PNG")?;
    }
    Ok(out)
}

/// Writes `out` through a temporary file in the same directory and a rename, so
/// a reader never sees half an image.
fn write_file(out: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plot".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))
}

/// Parses CSV text with RFC 4180 quoting into rows of cells.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut dirty = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        dirty = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    cell.push('"');
                    chars.next();
                }
                '"' => quoted = false,
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => row.push(std::mem::take(&mut cell)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
                dirty = false;
            }
            _ => cell.push(c),
        }
    }
    if dirty {
        row.push(cell);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "step,lr,train_loss,val_acc,val_loss\n\
                       1,0.1,1.0,,\n2,0.1,0.8,0.5,0.9\n3,0.05,0.6,,\n4,0.05,0.5,0.7,0.6\n";

    fn run_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        std::fs::write(dir.path().join("logs/metrics.csv"), CSV).unwrap();
        dir
    }

    #[test]
    fn train_and_val_share_a_panel() {
        let p = panels(CSV).unwrap();
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["loss", "lr", "val_acc"]);
        let labels: Vec<&str> = p[0].series.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(labels, ["train", "val"]);
        assert_eq!(p[0].series[1].1, vec![(2.0, 0.9), (4.0, 0.6)]);
        assert_eq!(split_name("loss/val"), ("loss".into(), Some("val")));
        assert_eq!(split_name("train/acc"), ("acc".into(), Some("train")));
        assert_eq!(split_name("train"), ("train".into(), None));
    }

    #[test]
    fn png_decodes_with_the_requested_size() {
        let dir = run_dir();
        let out = dir.path().join("curves.png");
        plot_with_size(dir.path(), &out, 640, 480).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (640, 480));
        let pixels = &buf[..info.buffer_size()];
        let blue = pixels.chunks(3).filter(|p| p == &[31, 119, 180]).count();
        let red = pixels.chunks(3).filter(|p| p == &[214, 39, 40]).count();
        assert!(blue > 50 && red > 50, "curves drawn: blue {blue} red {red}");
        let dark = pixels
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 60))
            .count();
        assert!(dark > 200, "text and axes drawn: {dark}");
    }

    #[test]
    fn svg_from_a_csv_path() {
        let dir = run_dir();
        let out = dir.path().join("curves.svg");
        plot(&dir.path().join("logs/metrics.csv"), &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        for text in ["loss", "val_acc", "lr", "step"] {
            assert!(svg.contains(&format!(">\n{text}\n<")), "missing {text}");
        }
    }

    #[test]
    fn tick_labels_are_short() {
        let l = |y: f64| tick_label(&y);
        assert_eq!(
            [
                l(0.95),
                l(1.5),
                l(0.0),
                l(100.0),
                l(0.001),
                l(1e-5),
                l(2.5e6)
            ],
            ["0.95", "1.5", "0", "100", "0.001", "1e-5", "2.5e6"]
        );
        assert_eq!(l(0.30000000000000004), "0.3");
    }

    #[test]
    fn run_name_is_the_run_directory() {
        let dir = run_dir();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(run_name(dir.path()), name);
        assert_eq!(run_name(&dir.path().join("logs/metrics.csv")), name);
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = run_dir();
        let err = plot(dir.path(), &dir.path().join("x.jpg")).unwrap_err();
        assert!(format!("{err:#}").contains(".png or .svg"), "{err:#}");
        let err = plot_with_size(dir.path(), &dir.path().join("x.png"), 10, 480).unwrap_err();
        assert!(format!("{err:#}").contains("--width 10"), "{err:#}");
        let csv = dir.path().join("nostep.csv");
        std::fs::write(&csv, "epoch,loss\n1,2\n").unwrap();
        let err = plot(&csv, &dir.path().join("x.png")).unwrap_err();
        assert!(format!("{err:#}").contains("no `step` column"), "{err:#}");
        let err = plot(&dir.path().join("missing"), &dir.path().join("x.png")).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read metrics file"),
            "{err:#}"
        );
        std::fs::write(&csv, "step,loss\n1,\n").unwrap();
        let err = plot(&csv, &dir.path().join("x.png")).unwrap_err();
        assert!(format!("{err:#}").contains("no metric values"), "{err:#}");
    }
}
