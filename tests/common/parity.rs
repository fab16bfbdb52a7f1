//! The parity bar shared by the golden tests (tests/parity.rs, tests/edit_parity.rs,
//! tests/a1111_parity.rs): an ONNX Runtime configured as the reference scripts ran it
//! (one intra-op thread), and the comparison of generated images with a reference's
//! float `.npy` and PNG: float images within 1e-3, PNG bytes within 1 level on ≥ 99.9%
//! of values and never more than 2 apart.

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use diffusiond::pipeline::{GenerateParams, GeneratedImage, Generation, Pipeline};
use diffusiond::runtime::{Runtime, RuntimeSettings};
use ndarray::{Array3, ArrayD};
use ndarray_npy::read_npy;

/// The ONNX Runtime of the golden tests: one intra-op and one inter-op thread, as the
/// reference scripts run theirs.
pub fn ort_runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let mut s = RuntimeSettings::default();
        s.session.intra_threads = 1;
        s.session.inter_threads = 1;
        Runtime::init(s).expect("ONNX Runtime (run scripts/setup)")
    })
}

/// The `cases` of a golden folder's `manifest.json`, each read as `C`.
pub fn manifest_cases<C: serde::de::DeserializeOwned>(dir: &Path) -> Vec<C> {
    #[derive(serde::Deserialize)]
    struct Manifest<C> {
        cases: Vec<C>,
    }
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<Manifest<C>>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .cases
}

/// Generates one golden case and checks what every golden test checks first: that it runs,
/// that the UNet saw the reference's timesteps, and that it made `images` images. `Err`
/// names the case and what differed.
pub fn generate_case(
    pipeline: &mut Pipeline,
    params: &GenerateParams,
    id: &str,
    unet_timesteps: &[f64],
    images: usize,
) -> Result<Generation, String> {
    let result = pipeline
        .generate(params, &mut |_, _| true)
        .map_err(|e| format!("{id}: {e}"))?;
    if result.timesteps != unet_timesteps {
        return Err(format!(
            "{id}: UNet timesteps {:?}, want {unet_timesteps:?}",
            result.timesteps
        ));
    }
    assert_eq!(result.images.len(), images, "{id}");
    Ok(result)
}

/// A PNG's pixels as `[H, W, 3]`.
pub fn read_png(path: &Path) -> Array3<u8> {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    Array3::from_shape_vec((h as usize, w as usize, 3), img.into_raw()).unwrap()
}

/// Worst differences seen over one case's images.
#[derive(Debug, Default, Clone, Copy)]
pub struct Diff {
    /// Largest float difference.
    pub float_max: f32,
    /// Largest PNG byte difference.
    pub pixel_max: u8,
    /// PNG bytes more than 1 level apart.
    pub pixel_over_1: usize,
    /// PNG bytes compared.
    pub pixels: usize,
}

impl Diff {
    /// Adds one generated image compared with the reference's `.npy` and PNG.
    pub fn add(&mut self, got: &GeneratedImage, npy: &Path, png: &Path) {
        let want: ArrayD<f32> = read_npy(npy).unwrap();
        let want = want.into_dimensionality::<ndarray::Ix3>().unwrap();
        assert_eq!(got.float.shape(), want.shape(), "{}", npy.display());
        self.float_max = (&got.float - &want)
            .iter()
            .fold(self.float_max, |m, d| m.max(d.abs()));
        let png = read_png(png);
        assert_eq!(got.rgb.shape(), png.shape(), "{}", npy.display());
        for (a, b) in got.rgb.iter().zip(png.iter()) {
            let d = a.abs_diff(*b);
            self.pixel_max = self.pixel_max.max(d);
            self.pixel_over_1 += usize::from(d > 1);
        }
        self.pixels += png.len();
    }

    /// One case's images against the reference files `npys` and `pngs` (paths relative
    /// to `dir`), image by image.
    pub fn of_images(got: &[GeneratedImage], dir: &Path, npys: &[String], pngs: &[String]) -> Diff {
        assert_eq!(got.len(), npys.len(), "images generated vs reference");
        let mut diff = Diff::default();
        for ((img, npy), png) in got.iter().zip(npys).zip(pngs) {
            diff.add(img, &dir.join(npy), &dir.join(png));
        }
        diff
    }

    /// Whether the case meets the parity bar.
    pub fn within_bar(&self) -> bool {
        self.within(1e-3)
    }

    /// The parity bar with another bound on the float images (the PNG bar is the same).
    pub fn within(&self, float_max: f32) -> bool {
        self.float_max <= float_max
            && self.pixel_max <= 2
            && self.pixel_over_1 * 1000 <= self.pixels
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "float max {:.2e}, pixel max {}, >1 level {}/{}",
            self.float_max, self.pixel_max, self.pixel_over_1, self.pixels
        )
    }
}

/// A golden case's expectations: its UNet timesteps and its reference files (paths relative
/// to the golden folder).
pub struct Golden<'a> {
    /// The case's id, for messages.
    pub id: &'a str,
    /// The timesteps the reference's UNet saw.
    pub unet_timesteps: &'a [f64],
    /// The reference `.npy` images.
    pub images: &'a [String],
    /// The reference PNGs.
    pub pngs: &'a [String],
}

/// Generates `params` and holds the images to the parity bar against `golden` (files in
/// `dir`); prints the differences. `Err` says what failed or missed.
pub fn check_case(
    pipeline: &mut Pipeline,
    params: &GenerateParams,
    golden: &Golden<'_>,
    dir: &Path,
) -> Result<Diff, String> {
    let result = generate_case(
        pipeline,
        params,
        golden.id,
        golden.unet_timesteps,
        golden.images.len(),
    )?;
    let diff = Diff::of_images(&result.images, dir, golden.images, golden.pngs);
    eprintln!("{}: {diff}", golden.id);
    if diff.within_bar() {
        Ok(diff)
    } else {
        Err(format!("{}: {diff}", golden.id))
    }
}
