//! What `diffusionctl` prints and writes: output file names, result summaries, tables.
//! Strings from the daemon go through [`printable`]: no control character reaches the
//! terminal.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use diffusiond::client::{
    ClientError, JobResult, JobSummary, LoraInfo, ModelInfo, Result, Status, printable,
};
use diffusiond::wire::JOB_PATH_PREFIX;

/// `OUT.png` for one image; `OUT-0.png`, `OUT-1.png`, ... for several.
pub fn output_paths(output: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let ext = output
        .extension()
        .map_or_else(|| "png".into(), |s| s.to_string_lossy().into_owned());
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Writes PNGs to the files [`output_paths`] names. Returns the files written.
pub fn write_pngs(pngs: &[Vec<u8>], output: &Path) -> Result<Vec<PathBuf>> {
    let paths = output_paths(output, pngs.len());
    for (png, path) in pngs.iter().zip(&paths) {
        std::fs::write(path, png).map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(paths)
}

/// Replaces `path` with `bytes` atomically: written to `path` + `.tmp`, then renamed over
/// it (a viewer watching the file never reads a half-written one).
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The number at the end of a job path, or the whole path when there is none.
pub fn job_label(path: &str) -> &str {
    path.strip_prefix(JOB_PATH_PREFIX).unwrap_or(path)
}

/// Writes a job's images to `OUT.png`, or `OUT-0.png`, `OUT-1.png`, ... for several
/// (the same names as `diffusionctl generate --local`). Returns the files written.
pub fn write_images(result: &JobResult, output: &Path) -> Result<Vec<PathBuf>> {
    let images = result.images.as_deref().unwrap_or_default();
    if images.is_empty() {
        return Err(ClientError::Protocol("the result holds no images".into()));
    }
    write_pngs(images, output)
}

/// A one-line summary of a result: seed, scheduler, size, steps, total time.
pub fn describe_result(result: &JobResult) -> String {
    let mut s = String::new();
    if let Some(model) = &result.model {
        let _ = write!(s, "model {}", printable(model));
    }
    if let Some(seed) = result.seed {
        let _ = write!(s, "{}seed {seed}", sep(&s));
    }
    if let Some(scheduler) = &result.scheduler {
        let _ = write!(s, "{}scheduler {}", sep(&s), printable(scheduler));
    }
    if let (Some(w), Some(h)) = (result.width, result.height) {
        let _ = write!(s, "{}{w}x{h}", sep(&s));
    }
    if let Some(steps) = result.steps {
        let _ = write!(s, "{}{steps} steps", sep(&s));
    }
    if let Some(total) = result.timings.as_ref().and_then(|t| t.get("total")) {
        let _ = write!(s, "{}{total:.2} s", sep(&s));
    }
    s
}

fn sep(s: &str) -> &'static str {
    if s.is_empty() { "" } else { ", " }
}

/// Formats `status` for people.
pub fn format_status(status: &Status) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "diffusiond {}", printable(&status.version));
    let _ = writeln!(s, "ONNX Runtime {}", printable(&status.runtime_version));
    let _ = writeln!(
        s,
        "execution providers: {}",
        printable(&status.execution_providers.join(", "))
    );
    let _ = writeln!(s, "queue length: {}", status.queue_length);
    let models: Vec<String> = status
        .models
        .iter()
        .map(|m| {
            let mut tags = Vec::new();
            if m.default {
                tags.push("default");
            }
            if m.loaded {
                tags.push("loaded");
            }
            // A load in progress (TensorRT: building engines) or a failed one.
            if matches!(m.state.as_str(), "loading" | "building" | "failed") {
                tags.push(m.state.as_str());
            }
            let name = printable(&m.name);
            if tags.is_empty() {
                name.into_owned()
            } else {
                format!("{name} ({})", tags.join(", "))
            }
        })
        .collect();
    let _ = writeln!(s, "models: {}", models.join(", "));
    s
}

/// Formats `ListModels` as a table, then one line per model with ControlNets
/// (`NAME controlnets: canny, depth`; none when no model has any).
pub fn format_models(models: &[ModelInfo]) -> String {
    let rows: Vec<[String; 6]> = models
        .iter()
        .map(|m| {
            [
                printable(&m.name).into_owned(),
                printable(&m.kind).into_owned(),
                printable(&m.scheduler).into_owned(),
                yes_no(m.loaded),
                yes_no(m.default),
                printable(&m.path).into_owned(),
            ]
        })
        .collect();
    let mut text = table(
        ["NAME", "KIND", "SCHEDULER", "LOADED", "DEFAULT", "PATH"],
        &rows,
    );
    for m in models.iter().filter(|m| !m.controlnets.is_empty()) {
        text.push_str(&format!(
            "{} controlnets: {}\n",
            printable(&m.name),
            printable(&m.controlnets.join(", "))
        ));
    }
    text
}

/// Formats `ListLoras` as a table.
pub fn format_loras(loras: &[LoraInfo]) -> String {
    let rows: Vec<[String; 6]> = loras
        .iter()
        .map(|l| {
            [
                printable(&l.name).into_owned(),
                printable(&l.hash).into_owned(),
                printable(&l.architecture).into_owned(),
                yes_no(l.fits),
                format!("{}", l.size),
                printable(&l.trigger_words.join(", ")).into_owned(),
            ]
        })
        .collect();
    let mut text = table(
        ["NAME", "HASH", "BASE", "FITS", "BYTES", "TRIGGER WORDS"],
        &rows,
    );
    for l in loras.iter().filter(|l| !l.error.is_empty()) {
        text.push_str(&format!(
            "{}: {}\n",
            printable(&l.name),
            printable(&l.error)
        ));
    }
    text
}

/// Formats `ListJobs` as a table.
pub fn format_jobs(jobs: &[JobSummary]) -> String {
    let rows: Vec<[String; 4]> = jobs
        .iter()
        .map(|j| {
            [
                printable(job_label(&j.path)).into_owned(),
                printable(&j.state).into_owned(),
                format!("{}/{}", j.step, j.total_steps),
                printable(&j.path).into_owned(),
            ]
        })
        .collect();
    table(["JOB", "STATE", "STEP", "PATH"], &rows)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Left-aligned columns, two spaces apart, no trailing spaces.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_images_get_numbered_names() {
        assert_eq!(
            output_paths(Path::new("/t/out.png"), 1),
            vec![PathBuf::from("/t/out.png")]
        );
        assert_eq!(
            output_paths(Path::new("/t/out.png"), 2),
            vec![PathBuf::from("/t/out-0.png"), PathBuf::from("/t/out-1.png")]
        );
        assert_eq!(job_label("/io/github/Diffusiond1/job/3"), "3");
    }

    #[test]
    fn tables_align_columns() {
        let t = format_jobs(&[JobSummary {
            path: "/io/github/Diffusiond1/job/1".into(),
            state: "running".into(),
            step: 3,
            total_steps: 20,
        }]);
        assert_eq!(
            t,
            "JOB  STATE    STEP  PATH\n1    running  3/20  /io/github/Diffusiond1/job/1\n"
        );
    }

    #[test]
    fn models_list_their_controlnets_under_the_table() {
        let model = |name: &str, controlnets: &[&str]| ModelInfo {
            name: name.into(),
            kind: "sd".into(),
            path: format!("/m/{name}"),
            controlnets: controlnets.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let t = format_models(&[model("plain", &[]), model("cn", &["canny", "depth"])]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert_eq!(lines[3], "cn controlnets: canny, depth");
        assert_eq!(format_models(&[model("plain", &[])]).lines().count(), 2);
    }

    #[test]
    fn daemon_strings_are_printed_escaped() {
        let t = format_jobs(&[JobSummary {
            path: "/j/1".into(),
            state: "run\x1b[2K\nning".into(),
            step: 0,
            total_steps: 1,
        }]);
        assert!(t.contains("run\\x1b[2K\\nning"), "{t}");
        assert_eq!(t.lines().count(), 2, "no forged line: {t}");
        let r = JobResult {
            model: Some("m\x07".into()),
            ..Default::default()
        };
        assert_eq!(describe_result(&r), "model m\\x07");
    }
}
