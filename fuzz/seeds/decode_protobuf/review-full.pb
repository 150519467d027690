
u1r1€óÍ€,bD
i98strap broke after a week, mail me at someone@example.com"en