//! # towers: the two-tower model, and nothing else
//!
//! The item encoder (content only, so a new item is embedded at once) and the user encoder
//! (a GRU over recent events plus context), both ending in unit vectors whose dot product,
//! divided by a temperature, scores a user against an item. Trainer, indexer and server all call
//! the same forward methods. This crate is the only one that knows the model's layers, and so it
//! also owns the model's saved form ([`artifact`]: `model.json`, weights checksum, the vocabulary
//! copy) and the one way prepared examples become model inputs ([`dataset`]), which every later
//! stage shares. The optional second stage that re-ranks the towers' candidates by co-occurrence
//! ([`cobuyers`]) is part of a saved model too, so it lives here with the towers.
//!
//! Data flow: features → **towers** → trainer / indexer → server.
//!
//! Scores are dot products of unit vectors, so they lie in [-1, 1] before the temperature:
//!
//! ```
//! use tch::Tensor;
//! let user = Tensor::from_slice(&[0.6f32, 0.8]);
//! let item = Tensor::from_slice(&[1.0f32, 0.0]);
//! let score = user.dot(&item).double_value(&[]);
//! assert!((score - 0.6).abs() < 1e-6);
//! ```

pub mod artifact;
pub mod bptt;
pub mod cobuyers;
pub mod config;
pub mod dataset;
pub mod device;
pub mod dot;
pub mod error;
mod gru_step;
pub mod inputs;
pub mod item;
pub mod layers;
pub mod model;
pub mod noise;
pub mod recurrence;
pub mod user;

pub use artifact::{LoadedModel, ModelInfo, ModelLayout};
pub use cobuyers::{CoBuyers, RerankInfo, Reranker};
pub use config::{Activation, TowerConfig, VocabSizes};
pub use device::{device_name, parse_device};
pub use error::{Error, Result};
pub use inputs::{
    EventInput, GatheredItems, ItemBatchHost, ItemInputs, UserBatchHost, UserInput, UserInputs,
};
pub use item::Hiding;
pub use model::TwoTower;

#[cfg(test)]
mod tests {
    //! Smoke test: proves real libtorch is linked by training a tiny model a few steps.
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Kind, Tensor};

    #[test]
    fn forward_backward_adam_step_lowers_loss() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = nn::seq()
            .add(nn::linear(vs.root() / "l1", 8, 16, Default::default()))
            .add_fn(|x| x.relu())
            .add(nn::linear(vs.root() / "l2", 16, 1, Default::default()));
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        let x = Tensor::randn([64, 8], (Kind::Float, Device::Cpu));
        let y = x.sum_dim_intlist(1, true, Kind::Float);
        let loss_of = |net: &nn::Sequential| (net.forward(&x) - &y).square().mean(Kind::Float);
        let before = loss_of(&net).double_value(&[]);
        for _ in 0..20 {
            let loss = loss_of(&net);
            opt.backward_step(&loss);
        }
        let after = loss_of(&net).double_value(&[]);
        assert!(
            after < before * 0.8,
            "loss did not fall: {before} -> {after}"
        );
    }
}
