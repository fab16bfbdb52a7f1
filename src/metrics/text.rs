//! The Prometheus text exposition format (version 0.0.4), written by hand: `# HELP` and
//! `# TYPE` lines, then one sample per line, label values escaped, histograms as cumulative
//! `_bucket{le=…}` lines with `_sum` and `_count`. Pure: a [`Text`] is a `String` being
//! built.
//!
//! Why not the `prometheus-client` crate: its encoder writes OpenMetrics, not this format.
//! It names a counter family without `_total` (`# TYPE diffusiond_jobs counter`, samples
//! `diffusiond_jobs_total`) and ends with `# EOF`; node_exporter's textfile collector and
//! `promtool check metrics` read the 0.0.4 format, where that is an empty counter family
//! beside an untyped `diffusiond_jobs_total` (promtool 2.42 fails such text: "no help
//! text"). The format is a dozen lines of rules, so writing it here costs less than
//! converting that output.

use std::fmt::Write as _;

/// A metric family's type, as its `# TYPE` line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets, with their sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Observations counted in fixed buckets (upper bounds, ascending), with their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more than `bounds` for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds, `+Inf` implied).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Counts one observation (a negative or non-finite one as 0).
    pub fn observe(&mut self, value: f64) {
        let v = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Metric text being written.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    /// Starts a family: its `# HELP` and `# TYPE` lines. Every sample of the family
    /// follows before the next family starts.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        self.0.push(' ');
        self.0.push_str(&number(value));
        self.0.push('\n');
    }

    /// A family with one sample and no labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram's samples (its family already started): cumulative buckets, `+Inf`,
    /// sum and count.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, count) in h.counts.iter().enumerate() {
            cumulative += count;
            let le = h
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| number(*b));
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count() as f64);
    }

    /// The text written.
    pub fn finish(self) -> String {
        self.0
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value: whole numbers without a fraction, `+Inf`, `-Inf`, `NaN`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.abs() >= 1e15 {
        format!("{v:e}")
    } else if v.fract() == 0.0 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escapes() {
        let mut t = Text::default();
        t.family("diffusiond_jobs_total", Kind::Counter, "Jobs\\ended");
        t.sample(
            "diffusiond_jobs_total",
            &[("model", "a\"b\\c\nd"), ("state", "failed")],
            3.0,
        );
        t.single("diffusiond_queue_length", Kind::Gauge, "Queued.", 0.5);
        assert_eq!(
            t.finish(),
            "# HELP diffusiond_jobs_total Jobs\\\\ended\n\
             # TYPE diffusiond_jobs_total counter\n\
             diffusiond_jobs_total{model=\"a\\\"b\\\\c\\nd\",state=\"failed\"} 3\n\
             # HELP diffusiond_queue_length Queued.\n\
             # TYPE diffusiond_queue_length gauge\n\
             diffusiond_queue_length 0.5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static BOUNDS: [f64; 3] = [0.5, 1.0, 10.0];
        let mut h = Histogram::new(&BOUNDS);
        for v in [0.1, 0.5, 2.0, 100.0, f64::NAN] {
            h.observe(v);
        }
        assert_eq!(h.count(), 5);
        let mut t = Text::default();
        t.histogram("x_seconds", &[("model", "m")], &h);
        assert_eq!(
            t.finish(),
            "x_seconds_bucket{model=\"m\",le=\"0.5\"} 3\n\
             x_seconds_bucket{model=\"m\",le=\"1\"} 3\n\
             x_seconds_bucket{model=\"m\",le=\"10\"} 4\n\
             x_seconds_bucket{model=\"m\",le=\"+Inf\"} 5\n\
             x_seconds_sum{model=\"m\"} 102.6\n\
             x_seconds_count{model=\"m\"} 5\n"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(1e300), "1e300");
    }
}
