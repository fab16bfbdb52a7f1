//! Admission through the engine: what a caller's queued and running jobs may hold
//! (`jobs.image_bytes_per_caller` counts every image a job carries).

use super::*;

#[test]
fn control_images_count_against_the_callers_image_bytes() {
    let settings = JobSettings {
        image_bytes_per_caller: 100,
        ..JobSettings::default()
    };
    let h = Harness::with_settings(settings, 1, None);
    let control = |bytes: usize| crate::request::Control {
        controlnet: "canny".into(),
        image: crate::request::ImageInput::new(vec![0u8; bytes]),
        scale: 1.0,
        start: 0.0,
        end: 1.0,
    };
    let job = |id: JobId, controls| QueuedJob {
        id,
        owner: 1000,
        sender: None,
        request: ResolvedRequest {
            seed: id,
            controls,
            ..resolved("a", 2)
        },
        output_fds: Vec::new(),
        queued_at: Instant::now(),
        background: false,
        reply: None,
    };
    // Two control images of 60 bytes: 120, over the caller's 100.
    let err = h
        .engine
        .submit(job(1, vec![control(60), control(60)]))
        .unwrap_err();
    assert!(
        err.to_string().contains("120 more, over the limit of 100"),
        "{err}"
    );
    h.fake.gate.open();
    h.engine.submit(job(2, vec![control(60)])).unwrap();
}
