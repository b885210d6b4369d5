//! `PerformerEncDec`: a PerformerLM encoder and a causal, cross-attending PerformerLM decoder
//! wrapped for the next-token loss.

use ndarray::{Array2, ArrayView2};
use performer_layers::Embedding;
use performer_tensor::{Module, Param, Result, Tensor, Visitor};

use crate::autoregressive::{AutoregressiveWrapper, SeqInputs};
use crate::config::PerformerEncDecConfig;
use crate::lm::{LmInputs, PerformerLM};
use crate::sampling::GenerateOptions;

/// Encoder-decoder Performer.
pub struct PerformerEncDec {
    config: PerformerEncDecConfig,
    /// The encoder (`enc.*`).
    pub enc: PerformerLM,
    /// The decoder with its loss (`dec.net.*`).
    pub dec: AutoregressiveWrapper,
}

impl PerformerEncDec {
    /// Builds both halves; with `tie_token_embeds` they share one token embedding.
    pub fn new(config: PerformerEncDecConfig) -> Result<Self> {
        config.validate()?;
        let dec_cfg = config.decoder();
        let dec_lm = PerformerLM::new(dec_cfg)?;
        let enc = if config.tie_token_embeds {
            let shared = Embedding {
                weight: Param::clone(&dec_lm.token_emb.weight),
            };
            PerformerLM::with_token_embedding(config.encoder(), shared)?
        } else {
            PerformerLM::new(config.encoder())?
        };
        let dec = AutoregressiveWrapper {
            net: dec_lm.into(),
            ignore_index: config.ignore_index,
            pad_value: config.pad_value,
        };
        Ok(PerformerEncDec { config, enc, dec })
    }

    /// The configuration.
    pub fn config(&self) -> &PerformerEncDecConfig {
        &self.config
    }

    /// Runs the encoder's and the decoder's FAVOR+ attention on CUDA device `ordinal`
    /// ([`crate::Performer::use_cuda`]); on error both stay on the CPU.
    pub fn use_cuda(&self, ordinal: usize) -> Result<()> {
        self.use_device(performer_favor::AttentionDevice::Cuda(ordinal))
    }

    /// [`PerformerEncDec::use_cuda`] on a GPU or the emulated device.
    pub fn use_device(&self, device: performer_favor::AttentionDevice) -> Result<()> {
        let result = self
            .enc
            .use_device(device)
            .and_then(|()| self.dec.net.use_device(device));
        if result.is_err() {
            self.use_cpu();
        }
        result
    }

    /// The encoder's and decoder's FAVOR+ attention back on the CPU.
    pub fn use_cpu(&self) {
        self.enc.use_cpu();
        self.dec.net.use_cpu();
    }

    /// The encoder's output for `src` `(b, ns)`.
    pub fn encode(
        &self,
        src: &ArrayView2<i64>,
        enc_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<Tensor> {
        self.enc.forward(
            src,
            &LmInputs {
                mask: enc_mask,
                return_encodings: true,
                ..Default::default()
            },
        )
    }

    /// The decoder's next-token loss on `tgt` `(b, nt)` given `src`; the encoder mask is also
    /// the decoder's context mask, as in the reference.
    pub fn loss(
        &self,
        src: &ArrayView2<i64>,
        tgt: &ArrayView2<i64>,
        enc_mask: Option<ArrayView2<'_, bool>>,
        dec_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<Tensor> {
        let encodings = self.encode(src, enc_mask)?;
        self.dec.loss(
            tgt,
            &SeqInputs {
                mask: dec_mask,
                context: Some(&encodings),
                context_mask: enc_mask,
            },
        )
    }

    /// Generates up to `seq_len` target tokens after `tgt_start` `(b, t)` for `src`.
    pub fn generate(
        &self,
        src: &ArrayView2<i64>,
        tgt_start: &ArrayView2<i64>,
        seq_len: usize,
        enc_mask: Option<ArrayView2<'_, bool>>,
        opts: &GenerateOptions,
    ) -> Result<Array2<i64>> {
        let encodings = self.encode_for_generation(src, enc_mask)?;
        self.dec.generate(
            tgt_start,
            seq_len,
            opts,
            &SeqInputs {
                mask: None,
                context: Some(&encodings),
                context_mask: enc_mask,
            },
        )
    }

    /// [`PerformerEncDec::generate`] by re-running the decoder over the prefix for each token.
    pub fn generate_recompute(
        &self,
        src: &ArrayView2<i64>,
        tgt_start: &ArrayView2<i64>,
        seq_len: usize,
        enc_mask: Option<ArrayView2<'_, bool>>,
        opts: &GenerateOptions,
    ) -> Result<Array2<i64>> {
        let encodings = self.encode_for_generation(src, enc_mask)?;
        self.dec.generate_recompute(
            tgt_start,
            seq_len,
            opts,
            &SeqInputs {
                mask: None,
                context: Some(&encodings),
                context_mask: enc_mask,
            },
        )
    }
}

impl PerformerEncDec {
    /// The encoder output in eval mode, without gradients.
    fn encode_for_generation(
        &self,
        src: &ArrayView2<i64>,
        enc_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<Tensor> {
        performer_tensor::no_grad(|| {
            // Only a model in training mode is written to (see `AutoregressiveWrapper::generate`).
            let was = crate::mode::is_training(&self.enc);
            if was {
                self.enc.set_training(false);
            }
            let e = self.encode(src, enc_mask);
            if was {
                self.enc.set_training(true);
            }
            e
        })
    }
}

impl Module for PerformerEncDec {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("enc", &self.enc);
        v.child("dec", &self.dec);
    }
}
