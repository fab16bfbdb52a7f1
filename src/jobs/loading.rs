//! Model loads: a model (or a model with a LoRA set) marked loading on a worker, loaded on
//! a thread of its own through the backend, and its result recorded in its slot.

use std::time::Instant;

use super::{Engine, Failure, Model, State, lora_sets};

impl Engine {
    /// Marks a model (or a model with a LoRA set: its model key) loading on `worker`
    /// and loads it on its own thread.
    pub(super) fn start_load(&self, st: &mut State, name: &str, worker: usize) {
        let (model, loras) = lora_sets::target(st, name);
        if !loras.is_empty() {
            self.make_room_for_set(st, &model, worker);
        }
        if !st.slots.begin_load(name, worker) {
            return;
        }
        self.publish_loads(st);
        let engine = self.clone();
        let owned = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("load-{model}"))
            .spawn(move || {
                let started = Instant::now();
                let result = engine.load(&model, &loras, worker);
                crate::metrics::model_load(&owned, started.elapsed(), result.is_ok());
                engine.finish_load(&owned, worker, result);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a model-loading thread");
            let message = format!("cannot start a model-loading thread: {e}");
            st.slots
                .finish_load(name, worker, Err(Failure::ModelLoad(message)));
            self.publish_loads(st);
        }
    }

    /// Loads model `name` with `loras` merged into its weights for `worker`.
    pub(super) fn load(
        &self,
        name: &str,
        loras: &[crate::lora::LoraSpec],
        worker: usize,
    ) -> Result<Box<dyn Model>, Failure> {
        let entry = self
            .shared
            .catalog
            .get(name)
            .ok_or_else(|| Failure::ModelLoad(format!("unknown model '{name}'")))?;
        let bundle = entry
            .bundle
            .as_ref()
            .map_err(|m| Failure::ModelLoad(m.clone()))?;
        self.shared
            .backend
            .load(name, bundle, loras, worker)
            .map_err(|e| match (e, self.shared.devices.len()) {
                (Failure::ModelLoad(e), n) if n > 1 => {
                    Failure::ModelLoad(format!("on {}: {e}", self.device(worker)))
                }
                (e, _) => e,
            })
    }

    pub(super) fn finish_load(
        &self,
        name: &str,
        worker: usize,
        result: Result<Box<dyn Model>, Failure>,
    ) {
        let device = self.device(worker);
        match &result {
            Ok(_) => tracing::info!(model = name, %device, "model loaded"),
            // A LoRA that does not fit: the request's fault, told to its jobs.
            Err(e @ Failure::InvalidArgument(_)) => {
                tracing::warn!(model = name, %device, error = %e, "LoRA set refused")
            }
            Err(e) => tracing::error!(model = name, %device, error = %e, "model failed to load"),
        }
        let mut st = self.lock();
        st.slots.finish_load(name, worker, result);
        self.publish_loads(&st);
        drop(st);
        self.notify();
    }
}
