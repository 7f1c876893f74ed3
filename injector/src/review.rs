//! AdmissionReview decoding and answering. OWNED BY: webhook helper.
